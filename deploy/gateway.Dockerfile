# llama-orch REST edge (gateway/): a static Go binary on a distroless base.
#   docker build -f deploy/gateway.Dockerfile -t llama-orch-gateway:0.1.0 .
FROM golang:1.26-bookworm AS build
WORKDIR /src/gateway
COPY gateway/go.mod gateway/go.sum ./
RUN go mod download
COPY gateway/ ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/llorch-gateway ./cmd/llorch-gateway

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/llorch-gateway /llorch-gateway
USER 65532
ENTRYPOINT ["/llorch-gateway"]
