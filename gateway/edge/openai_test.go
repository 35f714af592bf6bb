package edge

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	commonv1 "llama-orch/gateway/gen/llorch/common/v1"
	orchestratorv1 "llama-orch/gateway/gen/llorch/orchestrator/v1"
)

// fakeOrchestrator answers Generate with a scripted stream and ListModels with a fixed list,
// and remembers what it was asked.
type fakeOrchestrator struct {
	orchestratorv1.OrchestratorServiceClient // the calls the OpenAI routes do not make

	events []*orchestratorv1.GenerateResponse
	// end ends the stream after events: nil is io.EOF. With block the stream waits instead,
	// for the call's context or for release to close.
	end     error
	block   bool
	release chan struct{}

	models    []*orchestratorv1.ServedModel
	modelsErr error

	mu      sync.Mutex
	got     *orchestratorv1.GenerateRequest
	md      metadata.MD
	callCtx context.Context
	calls   int
}

func (f *fakeOrchestrator) Generate(ctx context.Context, in *orchestratorv1.GenerateRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[orchestratorv1.GenerateResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.got = in
	f.md, _ = metadata.FromOutgoingContext(ctx)
	f.callCtx = ctx
	return &fakeStream{ctx: ctx, events: f.events, end: f.end, block: f.block, release: f.release}, nil
}

func (f *fakeOrchestrator) ListModels(ctx context.Context, _ *orchestratorv1.ListModelsRequest, opts ...grpc.CallOption) (*orchestratorv1.ListModelsResponse, error) {
	f.mu.Lock()
	f.md, _ = metadata.FromOutgoingContext(ctx)
	f.mu.Unlock()
	for _, o := range opts {
		if h, ok := o.(grpc.HeaderCallOption); ok {
			*h.HeaderAddr = metadata.Pairs("x-correlation-id", "cid-models")
		}
	}
	if f.modelsErr != nil {
		return nil, f.modelsErr
	}
	return &orchestratorv1.ListModelsResponse{Models: f.models}, nil
}

func (f *fakeOrchestrator) generated(t *testing.T) *orchestratorv1.GenerateRequest {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.got == nil {
		t.Fatal("Generate was not called")
	}
	return f.got
}

type fakeStream struct {
	grpc.ClientStream // the methods a ServerStreamingClient's user does not call
	ctx               context.Context
	events            []*orchestratorv1.GenerateResponse
	end               error
	block             bool
	release           chan struct{}
}

func (s *fakeStream) Recv() (*orchestratorv1.GenerateResponse, error) {
	if len(s.events) > 0 {
		e := s.events[0]
		s.events = s.events[1:]
		return e, nil
	}
	if s.block {
		select {
		case <-s.ctx.Done():
			return nil, status.FromContextError(s.ctx.Err()).Err()
		case <-s.release:
			return nil, status.Error(codes.Unavailable, "released by the test")
		}
	}
	if s.end != nil {
		return nil, s.end
	}
	return nil, io.EOF
}

func (s *fakeStream) Header() (metadata.MD, error) {
	return metadata.Pairs("x-correlation-id", "cid-1"), nil
}

func (s *fakeStream) Trailer() metadata.MD     { return nil }
func (s *fakeStream) Context() context.Context { return s.ctx }
func (s *fakeStream) CloseSend() error         { return nil }
func (s *fakeStream) RecvMsg(any) error        { return nil }
func (s *fakeStream) SendMsg(any) error        { return nil }

func event(kind any) *orchestratorv1.GenerateResponse {
	e := &orchestratorv1.TaskEvent{TaskId: "t1"}
	switch k := kind.(type) {
	case *orchestratorv1.Queued:
		e.Kind = &orchestratorv1.TaskEvent_Queued{Queued: k}
	case *orchestratorv1.Started:
		e.Kind = &orchestratorv1.TaskEvent_Started{Started: k}
	case *commonv1.Token:
		e.Kind = &orchestratorv1.TaskEvent_Token{Token: k}
	case *orchestratorv1.Metrics:
		e.Kind = &orchestratorv1.TaskEvent_Metrics{Metrics: k}
	case *commonv1.Finished:
		e.Kind = &orchestratorv1.TaskEvent_Finished{Finished: k}
	}
	return &orchestratorv1.GenerateResponse{Event: e}
}

// script is a whole generation: queued, started, "Hello" in two messages (and an empty one),
// metrics, finished.
func script(reason commonv1.FinishReason) []*orchestratorv1.GenerateResponse {
	return []*orchestratorv1.GenerateResponse{
		event(&orchestratorv1.Queued{Position: 2}),
		event(&orchestratorv1.Started{PoolId: "p"}),
		event(&commonv1.Token{Index: 0, Text: "Hel", TokenIds: []int32{1}}),
		event(&commonv1.Token{Index: 1, Text: "", TokenIds: []int32{2}}),
		event(&commonv1.Token{Index: 2, Text: "lo <b>", TokenIds: []int32{3}}),
		event(&orchestratorv1.Metrics{DecodeTokensPerSecond: 10}),
		event(&commonv1.Finished{FinishReason: reason, TokensIn: 5, TokensOut: 3, TokensCached: 2}),
	}
}

func statusErr(t *testing.T, c codes.Code, msg string, details ...protoadapt.MessageV1) error {
	t.Helper()
	st, err := status.New(c, msg).WithDetails(details...)
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

var created = time.Unix(1700000000, 0)

func handlerOver(f *fakeOrchestrator, native http.Handler) http.Handler {
	o := newOpenAI(f)
	o.now = func() time.Time { return created }
	if native == nil {
		native = http.NotFoundHandler()
	}
	return limitBody(withOpenAI(o, native))
}

func do(t *testing.T, h http.Handler, method, path, body string, headers ...string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	for i := 0; i+1 < len(headers); i += 2 {
		r.Header.Set(headers[i], headers[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

// jsonEqual compares JSON texts as values.
func jsonEqual(t *testing.T, got, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal([]byte(got), &g); err != nil {
		t.Fatalf("not JSON: %v: %s", err, got)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("want is not JSON: %v", err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
}

func TestChatRequestMapping(t *testing.T) {
	f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_STOP)}
	body := `{
		"model": "tiny-llama",
		"messages": [
			{"role": "developer", "content": "Be brief."},
			{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}], "name": "ann"},
			{"role": "assistant", "content": null, "tool_calls": []},
			{"role": "tool", "content": "42", "tool_call_id": "c1"}
		],
		"max_tokens": 10, "max_completion_tokens": 20,
		"temperature": 0.5, "top_p": 0.9, "seed": -1, "stop": "END",
		"response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": true,
			"schema": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}}},
		"n": 1, "user": "u-1", "logprobs": false, "tools": [], "tool_choice": "none",
		"presence_penalty": 0, "logit_bias": {},
		"top_k": 5, "priority": "batch", "ignore_eos": true,
		"some_future_field": {"nested": [1, 2]}, "store": false
	}`
	w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/chat/completions", body,
		"Authorization", "Bearer sk-1", "X-Correlation-Id", "cid-in", "Traceparent", "00-abc-def-01")
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	want := &orchestratorv1.GenerateRequest{
		ModelId: "tiny-llama",
		Messages: []*orchestratorv1.ChatMessage{
			{Role: orchestratorv1.Role_ROLE_SYSTEM, Content: "Be brief."},
			{Role: orchestratorv1.Role_ROLE_USER, Content: "Hi\nthere"},
			{Role: orchestratorv1.Role_ROLE_ASSISTANT, Content: ""},
			{Role: orchestratorv1.Role_ROLE_TOOL, Content: "42"},
		},
		Sampling: &commonv1.SamplingParams{
			MaxTokens:   proto.Int32(20),
			Temperature: proto.Float32(0.5),
			TopP:        proto.Float32(0.9),
			TopK:        proto.Int32(5),
			Seed:        proto.Uint32(4294967295),
			Stop:        []string{"END"},
			IgnoreEos:   true,
		},
		Priority: commonv1.Priority_PRIORITY_BATCH,
		ResponseFormat: &orchestratorv1.ResponseFormat{Format: &orchestratorv1.ResponseFormat_JsonSchema{JsonSchema: &orchestratorv1.JsonSchemaFormat{
			// Key order kept: name before age.
			Schema: `{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}}}`,
			Name:   "person",
		}}},
	}
	if got := f.generated(t); !proto.Equal(got, want) {
		t.Fatalf("request\n got  %v\n want %v", got, want)
	}
	for key, value := range map[string]string{"authorization": "Bearer sk-1", "x-correlation-id": "cid-in", "traceparent": "00-abc-def-01"} {
		if got := f.md.Get(key); len(got) != 1 || got[0] != value {
			t.Errorf("metadata %s = %v, want %q", key, got, value)
		}
	}
	if got := w.Header().Get("X-Correlation-Id"); got != "cid-1" {
		t.Errorf("X-Correlation-Id = %q", got)
	}
}

func TestSeedWrapsModulo2To32(t *testing.T) {
	for seed, want := range map[string]uint32{"0": 0, "7": 7, "4294967296": 0, "4294967301": 5, "-1": 4294967295, "-4294967296": 0} {
		f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_STOP)}
		w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/completions", `{"model":"m","prompt":"x","seed":`+seed+`}`)
		if w.Code != http.StatusOK {
			t.Fatalf("seed %s: status %d: %s", seed, w.Code, w.Body)
		}
		if got := f.generated(t).GetSampling().GetSeed(); got != want {
			t.Errorf("seed %s became %d, want %d", seed, got, want)
		}
	}
}

func TestCompletionRequestMapping(t *testing.T) {
	f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_STOP)}
	w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/completions",
		`{"model":"m","prompt":["Once upon"],"max_tokens":7,"stop":["\n","."],"response_format":{"type":"json_object"},"priority":"interactive","echo":false,"best_of":1,"messages":"ignored here"}`)
	if w.Code != http.StatusOK {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	want := &orchestratorv1.GenerateRequest{
		ModelId:        "m",
		Prompt:         "Once upon",
		Sampling:       &commonv1.SamplingParams{MaxTokens: proto.Int32(7), Stop: []string{"\n", "."}},
		Priority:       commonv1.Priority_PRIORITY_INTERACTIVE,
		ResponseFormat: &orchestratorv1.ResponseFormat{Format: &orchestratorv1.ResponseFormat_JsonObject{JsonObject: &orchestratorv1.JsonObjectFormat{}}},
	}
	if got := f.generated(t); !proto.Equal(got, want) {
		t.Fatalf("request\n got  %v\n want %v", got, want)
	}
}

func TestRefusedRequests(t *testing.T) {
	chat := func(extra string) string {
		return `{"model":"m","messages":[{"role":"user","content":"hi"}]` + extra + `}`
	}
	for _, tc := range []struct {
		path, body, param, code string
	}{
		{"chat/completions", chat(`,"n":2`), "n", "unsupported_parameter"},
		{"chat/completions", chat(`,"tools":[{"type":"function","function":{"name":"f"}}]`), "tools", "unsupported_parameter"},
		{"chat/completions", chat(`,"tool_choice":{"type":"function","function":{"name":"f"}}`), "tool_choice", "unsupported_parameter"},
		{"chat/completions", chat(`,"functions":[{"name":"f"}]`), "functions", "unsupported_parameter"},
		{"chat/completions", chat(`,"function_call":"f"`), "function_call", "unsupported_parameter"},
		{"chat/completions", chat(`,"logprobs":true`), "logprobs", "unsupported_parameter"},
		{"chat/completions", chat(`,"top_logprobs":3`), "top_logprobs", "unsupported_parameter"},
		{"chat/completions", chat(`,"logit_bias":{"50256":-100}`), "logit_bias", "unsupported_parameter"},
		{"chat/completions", chat(`,"presence_penalty":0.5`), "presence_penalty", "unsupported_parameter"},
		{"chat/completions", chat(`,"frequency_penalty":-1`), "frequency_penalty", "unsupported_parameter"},
		{"chat/completions", chat(`,"temperature":"hot"`), "temperature", "invalid_type"},
		{"chat/completions", chat(`,"stream_options":{"include_usage":"yes"}`), "stream_options.include_usage", "invalid_type"},
		{"chat/completions", chat(`,"stop":[1]`), "stop", "invalid_type"},
		{"chat/completions", chat(`,"max_tokens":4294967296`), "max_tokens", "invalid_value"},
		{"chat/completions", chat(`,"priority":"urgent"`), "priority", "invalid_value"},
		{"chat/completions", chat(`,"response_format":{"type":"xml"}`), "response_format.type", "invalid_value"},
		{"chat/completions", chat(`,"response_format":{"type":"json_schema","json_schema":{"name":"x"}}`), "response_format.json_schema.schema", "missing_required_parameter"},
		{"chat/completions", `{"messages":[{"role":"user","content":"hi"}]}`, "model", "missing_required_parameter"},
		{"chat/completions", `{"model":"m"}`, "messages", "missing_required_parameter"},
		{"chat/completions", `{"model":"m","messages":[]}`, "messages", "invalid_value"},
		{"chat/completions", `{"model":"m","messages":[{"role":"wizard","content":"hi"}]}`, "messages[0].role", "invalid_value"},
		{"chat/completions", `{"model":"m","messages":[{"role":5,"content":"hi"}]}`, "messages[0].role", "invalid_type"},
		{"chat/completions", `{"model":"m","messages":["hi"]}`, "messages[0]", "invalid_type"},
		{"chat/completions", `{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`, "messages[1].content", "invalid_value"},
		{"chat/completions", `{"model":"m","messages":[{"role":"user","content":7}]}`, "messages[0].content", "invalid_type"},
		{"chat/completions", `{"model":"m","messages":[{"role":"assistant","content":"","tool_calls":[{"id":"c"}]}]}`, "messages[0].tool_calls", "unsupported_parameter"},
		{"completions", `{"model":"m","prompt":["a","b"]}`, "prompt", "invalid_value"},
		{"completions", `{"model":"m","prompt":[1,2,3]}`, "prompt", "invalid_value"},
		{"completions", `{"model":"m"}`, "prompt", "missing_required_parameter"},
		{"completions", `{"model":"m","prompt":"x","logprobs":0}`, "logprobs", "unsupported_parameter"},
		{"completions", `{"model":"m","prompt":"x","echo":true}`, "echo", "unsupported_parameter"},
		{"completions", `{"model":"m","prompt":"x","best_of":3}`, "best_of", "unsupported_parameter"},
		{"completions", `{"model":"m","prompt":"x","suffix":"end"}`, "suffix", "unsupported_parameter"},
		{"completions", `{"model":"m","prompt":"x","n":3}`, "n", "unsupported_parameter"},
		{"completions", `{"model":"m","prompt":"x","top_k":"many"}`, "top_k", "invalid_type"},
		{"completions", `not json`, "", "invalid_json"},
		{"completions", `[1]`, "", "invalid_type"},
	} {
		f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_STOP)}
		w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/"+tc.path, tc.body)
		var got errorBody
		if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil || w.Code != http.StatusBadRequest {
			t.Errorf("%s: status %d, body %s", tc.body, w.Code, w.Body)
			continue
		}
		param := ""
		if got.Error.Param != nil {
			param = *got.Error.Param
		}
		if param != tc.param || got.Error.Code == nil || *got.Error.Code != tc.code || got.Error.Type != "invalid_request_error" || got.Error.Message == "" {
			t.Errorf("%s: got %s, want param %q code %q", tc.body, w.Body, tc.param, tc.code)
		}
		if f.calls != 0 {
			t.Errorf("%s: refused, yet Generate was called", tc.body)
		}
	}
}

func TestBodyTooLarge(t *testing.T) {
	f := &fakeOrchestrator{}
	big := `{"model":"m","prompt":"` + strings.Repeat("x", MaxBodyBytes) + `"}`
	w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/completions", big)
	if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), `"code":"request_too_large"`) {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
}

func TestChatCompletionBody(t *testing.T) {
	f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_STOP_SEQUENCE)}
	w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/chat/completions",
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}`)
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("status %d %q: %s", w.Code, w.Header().Get("Content-Type"), w.Body)
	}
	jsonEqual(t, w.Body.String(), `{
		"id": "chatcmpl-t1", "object": "chat.completion", "created": 1700000000, "model": "m",
		"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello <b>"}, "finish_reason": "stop", "logprobs": null}],
		"usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2}}
	}`)
	if strings.Contains(w.Body.String(), `\u003c`) {
		t.Errorf("text is HTML-escaped: %s", w.Body)
	}
}

func TestTextCompletionBody(t *testing.T) {
	f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_LENGTH)}
	w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/completions", `{"model":"m","prompt":"x"}`)
	jsonEqual(t, w.Body.String(), `{
		"id": "cmpl-t1", "object": "text_completion", "created": 1700000000, "model": "m",
		"choices": [{"index": 0, "text": "Hello <b>", "finish_reason": "length", "logprobs": null}],
		"usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2}}
	}`)
}

// sseLines is a stream's body as its non-empty lines.
func sseLines(body string) []string {
	var lines []string
	for _, line := range strings.Split(body, "\n") {
		if line != "" {
			lines = append(lines, line)
		}
	}
	return lines
}

func TestChatStreamWithUsage(t *testing.T) {
	f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_LENGTH)}
	w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/chat/completions",
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}`)
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "text/event-stream" || w.Header().Get("Cache-Control") != "no-cache" {
		t.Fatalf("status %d, headers %v", w.Code, w.Header())
	}
	if !strings.HasSuffix(w.Body.String(), "\n\n") {
		t.Errorf("the stream does not end with an event's blank line: %q", w.Body)
	}
	head := `data: {"id":"chatcmpl-t1","object":"chat.completion.chunk","created":1700000000,"model":"m",`
	want := []string{
		": queued position 2",
		head + `"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}`,
		head + `"choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}],"usage":null}`,
		head + `"choices":[{"index":0,"delta":{"content":"lo <b>"},"logprobs":null,"finish_reason":null}],"usage":null}`,
		head + `"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}],"usage":null}`,
		head + `"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8,"prompt_tokens_details":{"cached_tokens":2}}}`,
		"data: [DONE]",
	}
	if got := sseLines(w.Body.String()); !reflect.DeepEqual(got, want) {
		t.Fatalf("stream\n got  %q\n want %q", got, want)
	}
}

func TestCompletionStreamWithoutUsage(t *testing.T) {
	f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_STOP)}
	w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/completions", `{"model":"m","prompt":"x","stream":true}`)
	head := `data: {"id":"cmpl-t1","object":"text_completion","created":1700000000,"model":"m",`
	want := []string{
		": queued position 2",
		head + `"choices":[{"index":0,"text":"Hel","logprobs":null,"finish_reason":null}]}`,
		head + `"choices":[{"index":0,"text":"lo <b>","logprobs":null,"finish_reason":null}]}`,
		head + `"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"stop"}]}`,
		"data: [DONE]",
	}
	if got := sseLines(w.Body.String()); !reflect.DeepEqual(got, want) {
		t.Fatalf("stream\n got  %q\n want %q", got, want)
	}
}

func TestErrorBeforeFirstByte(t *testing.T) {
	queueFull := statusErr(t, codes.ResourceExhausted, "the queue is full",
		&errdetails.ErrorInfo{Reason: "QUEUE_FULL", Domain: "llama-orch"},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(1200 * time.Millisecond)})
	tooLong := statusErr(t, codes.InvalidArgument, "sampling.max_tokens: must be below 2048",
		&errdetails.ErrorInfo{Reason: "INVALID_ARGUMENT"},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "sampling.max_tokens", Description: "must be below 2048"}}})
	for _, tc := range []struct {
		name       string
		err        error
		stream     bool
		status     int
		retryAfter string
		body       string
	}{
		{"queue full, streaming", queueFull, true, 429, "2",
			`{"error":{"message":"the queue is full","type":"rate_limit_error","param":null,"code":"queue_full"}}`},
		{"queue full", queueFull, false, 429, "2",
			`{"error":{"message":"the queue is full","type":"rate_limit_error","param":null,"code":"queue_full"}}`},
		{"field named as sent", tooLong, true, 400, "",
			`{"error":{"message":"sampling.max_tokens: must be below 2048","type":"invalid_request_error","param":"max_completion_tokens","code":"invalid_argument"}}`},
		{"unknown model", statusErr(t, codes.NotFound, "model x is not in the catalog", &errdetails.ErrorInfo{Reason: "MODEL_NOT_FOUND"}), true, 404, "",
			`{"error":{"message":"model x is not in the catalog","type":"invalid_request_error","param":"model","code":"model_not_found"}}`},
		{"model not allowed", statusErr(t, codes.PermissionDenied, "key k may not use model x", &errdetails.ErrorInfo{Reason: "MODEL_NOT_ALLOWED"}), false, 403, "",
			`{"error":{"message":"key k may not use model x","type":"permission_error","param":"model","code":"model_not_allowed"}}`},
		{"no key", statusErr(t, codes.Unauthenticated, "no API key", &errdetails.ErrorInfo{Reason: "API_KEY_MISSING"}), true, 401, "",
			`{"error":{"message":"no API key","type":"authentication_error","param":null,"code":"api_key_missing"}}`},
		{"unreachable", status.Error(codes.Unavailable, "connection refused"), true, 503, "",
			`{"error":{"message":"connection refused","type":"server_error","param":null,"code":null}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeOrchestrator{end: tc.err}
			w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/chat/completions",
				`{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":4096,"stream":`+map[bool]string{true: "true", false: "false"}[tc.stream]+`}`)
			if w.Code != tc.status || w.Header().Get("Content-Type") != "application/json" {
				t.Fatalf("status %d %q, want %d: %s", w.Code, w.Header().Get("Content-Type"), tc.status, w.Body)
			}
			if got := w.Header().Get("Retry-After"); got != tc.retryAfter {
				t.Errorf("Retry-After %q, want %q", got, tc.retryAfter)
			}
			if got := w.Header().Get("X-Correlation-Id"); got != "cid-1" {
				t.Errorf("X-Correlation-Id %q", got)
			}
			jsonEqual(t, w.Body.String(), tc.body)
		})
	}
}

func TestErrorAfterFirstByte(t *testing.T) {
	f := &fakeOrchestrator{
		events: script(commonv1.FinishReason_FINISH_REASON_STOP)[:3],
		end:    statusErr(t, codes.Unavailable, "the worker crashed", &errdetails.ErrorInfo{Reason: "WORKER_CRASHED"}),
	}
	w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/chat/completions",
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}`)
	if w.Code != http.StatusOK {
		t.Fatalf("status %d", w.Code)
	}
	lines := sseLines(w.Body.String())
	if len(lines) != 4 || !strings.Contains(lines[2], `"content":"Hel"`) {
		t.Fatalf("stream %q", lines)
	}
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last, "data: ") {
		t.Fatalf("last line %q", last)
	}
	jsonEqual(t, strings.TrimPrefix(last, "data: "),
		`{"error":{"message":"the worker crashed","type":"server_error","param":null,"code":"worker_crashed"}}`)
	if strings.Contains(w.Body.String(), "[DONE]") {
		t.Error("a failed stream ends with [DONE]")
	}
}

func TestStreamEndingWithoutFinishIsAnError(t *testing.T) {
	f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_STOP)[:3]}
	w := do(t, handlerOver(f, nil), http.MethodPost, "/openai/v1/completions", `{"model":"m","prompt":"x"}`)
	if w.Code != http.StatusBadGateway || !strings.Contains(w.Body.String(), `"type":"server_error"`) {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
}

func TestModels(t *testing.T) {
	f := &fakeOrchestrator{models: []*orchestratorv1.ServedModel{
		{ModelId: "tiny-llama", ContextLength: 2048, Chat: true, CreatedUnixMs: 1700000000999},
		{ModelId: "org/base", CreatedUnixMs: 1600000000000},
	}}
	h := handlerOver(f, nil)
	w := do(t, h, http.MethodGet, "/openai/v1/models", "", "Authorization", "Bearer sk-2")
	if w.Code != http.StatusOK || w.Header().Get("X-Correlation-Id") != "cid-models" {
		t.Fatalf("status %d, headers %v", w.Code, w.Header())
	}
	jsonEqual(t, w.Body.String(), `{"object":"list","data":[
		{"id":"tiny-llama","object":"model","created":1700000000,"owned_by":"llama-orch"},
		{"id":"org/base","object":"model","created":1600000000,"owned_by":"llama-orch"}]}`)
	if got := f.md.Get("authorization"); len(got) != 1 || got[0] != "Bearer sk-2" {
		t.Errorf("authorization metadata %v", got)
	}
	w = do(t, h, http.MethodGet, "/openai/v1/models/org/base", "")
	jsonEqual(t, w.Body.String(), `{"id":"org/base","object":"model","created":1600000000,"owned_by":"llama-orch"}`)
	w = do(t, h, http.MethodGet, "/openai/v1/models/other", "")
	if w.Code != http.StatusNotFound || !strings.Contains(w.Body.String(), `"code":"model_not_found"`) {
		t.Fatalf("unknown model: status %d: %s", w.Code, w.Body)
	}

	empty := handlerOver(&fakeOrchestrator{}, nil)
	jsonEqual(t, do(t, empty, http.MethodGet, "/openai/v1/models", "").Body.String(), `{"object":"list","data":[]}`)

	denied := handlerOver(&fakeOrchestrator{modelsErr: statusErr(t, codes.Unauthenticated, "the API key is unknown", &errdetails.ErrorInfo{Reason: "API_KEY_INVALID"})}, nil)
	w = do(t, denied, http.MethodGet, "/openai/v1/models", "")
	if w.Code != http.StatusUnauthorized {
		t.Fatalf("status %d", w.Code)
	}
	jsonEqual(t, w.Body.String(), `{"error":{"message":"the API key is unknown","type":"authentication_error","param":null,"code":"api_key_invalid"}}`)
}

func TestRouting(t *testing.T) {
	native := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusTeapot) })
	h := handlerOver(&fakeOrchestrator{}, native)
	w := do(t, h, http.MethodGet, "/openai/v1/chat/completions", "")
	if w.Code != http.StatusMethodNotAllowed || w.Header().Get("Allow") != http.MethodPost || !strings.Contains(w.Body.String(), `"type":"invalid_request_error"`) {
		t.Errorf("wrong method: %d %v %s", w.Code, w.Header(), w.Body)
	}
	w = do(t, h, http.MethodPost, "/openai/v1/models", "")
	if w.Code != http.StatusMethodNotAllowed || w.Header().Get("Allow") != http.MethodGet {
		t.Errorf("wrong method on models: %d", w.Code)
	}
	for _, path := range []string{"/openai/v1/embeddings", "/openai/v1/models/", "/openai", "/openai/v2/chat/completions"} {
		w = do(t, h, http.MethodPost, path, "{}")
		if w.Code != http.StatusNotFound || !strings.Contains(w.Body.String(), `"code":"unknown_url"`) {
			t.Errorf("%s: %d %s", path, w.Code, w.Body)
		}
	}
	for _, path := range []string{"/v1/generate", "/openapi.json", "/openaiv1/models"} {
		if w = do(t, h, http.MethodGet, path, ""); w.Code != http.StatusTeapot {
			t.Errorf("%s did not reach the native routes: %d", path, w.Code)
		}
	}
}

// A client that goes away mid-stream cancels the gRPC call (and so the task).
func TestDisconnectCancelsTheCall(t *testing.T) {
	f := &fakeOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_STOP)[:3], block: true, release: make(chan struct{})}
	server := httptest.NewServer(handlerOver(f, nil))
	defer server.Close()
	defer close(f.release) // before Close, which waits for the handler, when the test fails
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reqCtx, hangUp := context.WithCancel(ctx)
	req, err := http.NewRequestWithContext(reqCtx, http.MethodPost, server.URL+"/openai/v1/chat/completions",
		strings.NewReader(`{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}`))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	lines := bufio.NewScanner(resp.Body)
	for lines.Scan() {
		if strings.Contains(lines.Text(), `"content":"Hel"`) {
			break // the stream is under way, and blocks in Recv now
		}
	}
	hangUp()
	f.mu.Lock()
	callCtx := f.callCtx
	f.mu.Unlock()
	select {
	case <-callCtx.Done():
	case <-ctx.Done():
		t.Fatal("the call was not cancelled when the client went away")
	}
}

// grpcOrchestrator is a real gRPC OrchestratorService for the tests that go through
// NewHandler and gRPC's transport: it echoes the correlation id in its header (as the
// orchestrator does, or only in its trailer with trailersOnly), sends events and ends with err.
type grpcOrchestrator struct {
	orchestratorv1.UnimplementedOrchestratorServiceServer
	events       []*orchestratorv1.GenerateResponse
	err          error
	trailersOnly bool
	got          chan metadata.MD
}

func (s *grpcOrchestrator) Generate(_ *orchestratorv1.GenerateRequest, stream grpc.ServerStreamingServer[orchestratorv1.GenerateResponse]) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	s.got <- md
	echo := metadata.Pairs("x-correlation-id", "echo-"+strings.Join(md.Get("x-correlation-id"), ","))
	if s.trailersOnly {
		stream.SetTrailer(echo)
		return s.err
	}
	if err := stream.SendHeader(echo); err != nil {
		return err
	}
	for _, e := range s.events {
		if err := stream.Send(e); err != nil {
			return err
		}
	}
	return s.err
}

func (s *grpcOrchestrator) ListModels(ctx context.Context, _ *orchestratorv1.ListModelsRequest) (*orchestratorv1.ListModelsResponse, error) {
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-correlation-id", "echo-models"))
	return &orchestratorv1.ListModelsResponse{Models: []*orchestratorv1.ServedModel{{ModelId: "tiny", CreatedUnixMs: 1000}}}, nil
}

// serveOverGRPC is NewHandler's edge over srv on a real gRPC connection.
func serveOverGRPC(t *testing.T, srv *grpcOrchestrator) *httptest.Server {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	orchestratorv1.RegisterOrchestratorServiceServer(server, srv)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	conn, err := grpc.NewClient(listener.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	handler, err := NewHandler(ctx, Backends{Orchestrator: conn}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	edge := httptest.NewServer(handler)
	t.Cleanup(edge.Close)
	return edge
}

func post(t *testing.T, url, body string) (*http.Response, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer sk-3")
	req.Header.Set("X-Correlation-Id", "c-9")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

func TestOverGRPCStream(t *testing.T) {
	srv := &grpcOrchestrator{events: script(commonv1.FinishReason_FINISH_REASON_STOP), got: make(chan metadata.MD, 1)}
	edge := serveOverGRPC(t, srv)
	resp, body := post(t, edge.URL+"/openai/v1/chat/completions",
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}`)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Correlation-Id") != "echo-c-9" {
		t.Fatalf("status %d, headers %v", resp.StatusCode, resp.Header)
	}
	lines := sseLines(body)
	if len(lines) != 6 || lines[len(lines)-1] != "data: [DONE]" {
		t.Fatalf("stream %q", lines)
	}
	md := <-srv.got
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer sk-3" {
		t.Errorf("authorization metadata %v", got)
	}
	// The native routes still answer beside ours.
	resp, body = post(t, edge.URL+"/v1/generate", `{"model_id":"m","prompt":"x"}`)
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, `{"result":`) {
		t.Fatalf("native route: status %d: %s", resp.StatusCode, body)
	}
}

func TestOverGRPCErrors(t *testing.T) {
	queueFull := statusErr(t, codes.ResourceExhausted, "the queue is full",
		&errdetails.ErrorInfo{Reason: "QUEUE_FULL"}, &errdetails.RetryInfo{RetryDelay: durationpb.New(3 * time.Second)})
	for _, trailersOnly := range []bool{false, true} {
		srv := &grpcOrchestrator{err: queueFull, trailersOnly: trailersOnly, got: make(chan metadata.MD, 1)}
		edge := serveOverGRPC(t, srv)
		resp, body := post(t, edge.URL+"/openai/v1/completions", `{"model":"m","prompt":"x","stream":true}`)
		if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "3" || resp.Header.Get("X-Correlation-Id") != "echo-c-9" {
			t.Errorf("trailers only %t: status %d, headers %v", trailersOnly, resp.StatusCode, resp.Header)
		}
		jsonEqual(t, body, `{"error":{"message":"the queue is full","type":"rate_limit_error","param":null,"code":"queue_full"}}`)
	}
	srv := &grpcOrchestrator{got: make(chan metadata.MD, 1)}
	edge := serveOverGRPC(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, edge.URL+"/openai/v1/models", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Correlation-Id") != "echo-models" {
		t.Fatalf("models: status %d, headers %v", resp.StatusCode, resp.Header)
	}
}
