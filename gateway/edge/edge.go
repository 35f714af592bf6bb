// Package edge builds the REST edge of llama-orch: a grpc-gateway mux over the orchestrator's
// OrchestratorService and ControlService (and the catalog's CatalogService when given), with the
// conventions client developers rely on:
//
//   - JSON field names are the proto names (task_id, not taskId); unknown fields are refused.
//   - Under /openai/v1, hand-written handlers (openai.go) serve OpenAI's API over the same
//     orchestrator calls: OpenAI's shapes, SSE streams and error body; unknown fields ignored.
//   - Server-streaming calls (Generate, StreamTask) answer application/x-ndjson: one
//     {"result": {...}} line per message, written and flushed as each message arrives, and one
//     {"error": {...}} line if the stream fails after it started.
//   - A failed call answers the HTTP status of its gRPC code with the google.rpc.Status as the
//     body, details included (ErrorInfo, BadRequest naming the field, RetryInfo); RetryInfo also
//     becomes a Retry-After header.
//   - Authorization (the API key) and x-correlation-id go to the orchestrator as gRPC metadata,
//     as do W3C traceparent/tracestate; the orchestrator's x-correlation-id comes back as the
//     X-Correlation-Id header.
//   - /openapi.json serves the generated OpenAPI v2 document; /healthz asks the orchestrator's
//     grpc.health.v1 service.
package edge

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	catalogv1 "llama-orch/gateway/gen/llorch/catalog/v1"
	orchestratorv1 "llama-orch/gateway/gen/llorch/orchestrator/v1"
	"llama-orch/gateway/openapi"
)

// MaxBodyBytes bounds a request body. The orchestrator refuses larger gRPC messages anyway
// (4 MiB by default); reading more would only cost the edge memory.
const MaxBodyBytes = 4 << 20

// passedHeaders are request headers that travel to the backends as gRPC metadata of the same
// (lower-case) name. Authorization always does (grpc-gateway passes it unprefixed).
var passedHeaders = map[string]bool{
	"x-correlation-id": true,
	"traceparent":      true,
	"tracestate":       true,
}

// Backends are the gRPC connections the edge forwards to.
type Backends struct {
	Orchestrator *grpc.ClientConn
	// Catalog is nil when the catalog's REST routes are not offered.
	Catalog *grpc.ClientConn
}

// NewHandler is the REST edge over backends, wrapped in request logging and a body limit.
func NewHandler(ctx context.Context, backends Backends, log *slog.Logger) (http.Handler, error) {
	mux := runtime.NewServeMux(
		runtime.WithMarshalerOption(runtime.MIMEWildcard, &ndjsonMarshaler{JSONPb: &runtime.JSONPb{
			MarshalOptions:   protojson.MarshalOptions{UseProtoNames: true, EmitDefaultValues: true},
			UnmarshalOptions: protojson.UnmarshalOptions{DiscardUnknown: false},
		}}),
		runtime.WithIncomingHeaderMatcher(incomingHeader),
		runtime.WithOutgoingHeaderMatcher(outgoingHeader),
		runtime.WithErrorHandler(errorWithRetryAfter),
		runtime.WithStreamErrorHandler(streamErrorWithRetryAfter),
		runtime.WithHealthzEndpoint(grpc_health_v1.NewHealthClient(backends.Orchestrator)),
	)
	if err := orchestratorv1.RegisterOrchestratorServiceHandler(ctx, mux, backends.Orchestrator); err != nil {
		return nil, fmt.Errorf("OrchestratorService routes: %w", err)
	}
	if err := orchestratorv1.RegisterControlServiceHandler(ctx, mux, backends.Orchestrator); err != nil {
		return nil, fmt.Errorf("ControlService routes: %w", err)
	}
	if backends.Catalog != nil {
		if err := catalogv1.RegisterCatalogServiceHandler(ctx, mux, backends.Catalog); err != nil {
			return nil, fmt.Errorf("CatalogService routes: %w", err)
		}
	}
	err := mux.HandlePath(http.MethodGet, "/openapi.json", func(w http.ResponseWriter, _ *http.Request, _ map[string]string) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(openapi.Document)
	})
	if err != nil {
		return nil, fmt.Errorf("/openapi.json: %w", err)
	}
	openai := newOpenAI(orchestratorv1.NewOrchestratorServiceClient(backends.Orchestrator))
	return logRequests(limitBody(withOpenAI(openai, keepWriter(mux))), log), nil
}

// ndjsonMarshaler is JSONPb whose streams are labelled newline-delimited JSON, and whose
// single-message bodies end with a newline too, as a terminal (and a line reader) expects.
type ndjsonMarshaler struct {
	*runtime.JSONPb
}

// Marshal ends a whole body (a proto message: a unary response or an error) with a newline.
// Stream chunks arrive wrapped in maps, and grpc-gateway writes their delimiter itself.
func (m *ndjsonMarshaler) Marshal(v any) ([]byte, error) {
	b, err := m.JSONPb.Marshal(v)
	if _, whole := v.(proto.Message); whole && err == nil {
		b = append(b, '\n')
	}
	return b, err
}

// StreamContentType is the Content-Type of a server-streaming response.
func (*ndjsonMarshaler) StreamContentType(any) string { return "application/x-ndjson" }

func incomingHeader(key string) (string, bool) {
	lower := strings.ToLower(key)
	if passedHeaders[lower] {
		return lower, true
	}
	return runtime.DefaultHeaderMatcher(key)
}

// outgoingHeader names the orchestrator's response metadata as HTTP headers: x-correlation-id
// as itself, gRPC's own (content-type, grpc-*) not at all, anything else as
// Grpc-Metadata-<key>.
func outgoingHeader(key string) (string, bool) {
	lower := strings.ToLower(key)
	switch {
	case lower == "x-correlation-id":
		return "X-Correlation-Id", true
	case lower == "content-type" || strings.HasPrefix(lower, "grpc-"):
		return "", false
	}
	return runtime.MetadataHeaderPrefix + key, true
}

// errorWithRetryAfter is grpc-gateway's error answer plus a Retry-After header when the status
// carries google.rpc.RetryInfo (a full queue, a rate limit, a pool still loading).
func errorWithRetryAfter(ctx context.Context, mux *runtime.ServeMux, m runtime.Marshaler, w http.ResponseWriter, r *http.Request, err error) {
	setRetryAfter(w, status.Convert(err))
	runtime.DefaultHTTPErrorHandler(ctx, mux, m, w, r, err)
}

// streamErrorWithRetryAfter does the same for a stream. grpc-gateway hands a stream's error
// handler only the context, so the writer travels in it (keepWriter); the header still goes
// out when the stream fails before its first line, as the status is written after this.
func streamErrorWithRetryAfter(ctx context.Context, err error) *status.Status {
	st := status.Convert(err)
	if w, ok := ctx.Value(writerKey{}).(http.ResponseWriter); ok {
		setRetryAfter(w, st)
	}
	return st
}

func setRetryAfter(w http.ResponseWriter, st *status.Status) {
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.RetryInfo); ok && info.GetRetryDelay() != nil {
			seconds := math.Ceil(info.GetRetryDelay().AsDuration().Seconds())
			w.Header().Set("Retry-After", strconv.Itoa(max(1, int(seconds))))
		}
	}
}

type writerKey struct{}

// keepWriter puts the response writer in the request's context for streamErrorWithRetryAfter.
func keepWriter(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), writerKey{}, w)))
	})
}

func limitBody(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, MaxBodyBytes)
		next.ServeHTTP(w, r)
	})
}

// statusRecorder remembers the status of a response; Unwrap lets http.ResponseController
// reach the real writer's Flush, which streaming needs.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// logRequests logs one JSON line per request: method, path, status, duration and correlation
// id. Never headers or bodies: they hold API keys and prompts.
func logRequests(next http.Handler, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
		log.Info("request",
			"method", r.Method,
			"path", r.URL.Path,
			"status", rec.status,
			"duration_ms", float64(time.Since(started).Microseconds())/1000,
			"correlation_id", w.Header().Get("X-Correlation-Id"),
		)
	})
}
