// The OpenAI-compatible API, under /openai/v1, so that an OpenAI client works against the mesh
// as it is: openai.OpenAI(base_url="http://HOST:PORT/openai/v1", api_key=KEY). These are
// hand-written handlers beside the generated routes (the native REST API stays under /v1): each
// turns an OpenAI request into an OrchestratorService call and the answer back into OpenAI's
// shapes, with the same metadata the native routes pass (Authorization, x-correlation-id,
// traceparent, tracestate) and the X-Correlation-Id header back.
//
// Routes:
//
//	POST /openai/v1/chat/completions  Generate with messages (chat.completion, or SSE chunks)
//	POST /openai/v1/completions       Generate with a prompt (text_completion, or SSE chunks)
//	GET  /openai/v1/models            ListModels, as OpenAI's model list
//	GET  /openai/v1/models/{id}       one of those, or 404 model_not_found
//
// Request fields. Unknown fields are ignored, as every OpenAI-compatible server does (clients
// send metadata, store, service_tier... freely); a known field of the wrong JSON type is a 400
// naming it.
//
//	honoured   model; messages (role system, developer (as system), user, assistant, tool;
//	           content a string or text parts, joined with "\n"); prompt (a string, or a list
//	           of one string); stream; stream_options.include_usage; max_tokens,
//	           max_completion_tokens (chat; it wins over max_tokens); temperature; top_p; seed
//	           (modulo 2^32, see seedOf); stop (a string or a list); response_format (text,
//	           json_object, json_schema: enforced by a grammar whether strict is set or not);
//	           our extras top_k, priority ("interactive" | "batch"), ignore_eos.
//	ignored    user, name, metadata, store, parallel_tool_calls and every other unknown field;
//	           n 1, logprobs false, top_logprobs 0, logit_bias {}, presence_penalty 0,
//	           frequency_penalty 0, echo false, best_of 1, suffix "", tools [], functions [],
//	           tool_choice and function_call "none" or "auto" (with no tools they change
//	           nothing); stream_options without stream.
//	refused    what would change the answer if honoured, so that ignoring it would answer
//	           something other than was asked: n > 1, tools, functions, tool_choice or
//	           function_call naming a tool, assistant messages with tool_calls, content parts
//	           other than text, logprobs (true, or any number for completions), top_logprobs,
//	           logit_bias, presence_penalty, frequency_penalty, echo, best_of > 1, suffix,
//	           a prompt list of several prompts or of token ids. Each is a 400 naming it.
//
// Errors are OpenAI's body {"error": {"message", "type", "param", "code"}}: the HTTP status
// comes from the gRPC code (see apiErrorOf), param from the first BadRequest field violation
// (our names turned into OpenAI's: sampling.temperature is temperature, model_id is model),
// code is the ErrorInfo reason in lower case (queue_full, model_not_allowed), and RetryInfo
// becomes Retry-After. A stream answers an error as a plain HTTP error while it has written
// nothing (it waits for the orchestrator's first event before its first byte), and as one
// `data: {"error": ...}` event without [DONE] after that.
//
// Every gRPC call runs on the HTTP request's context, so a client that goes away cancels its
// call, which the orchestrator turns into a cancelled task.

package edge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"reflect"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	commonv1 "llama-orch/gateway/gen/llorch/common/v1"
	orchestratorv1 "llama-orch/gateway/gen/llorch/orchestrator/v1"
)

// openAIBase is the base URL of the OpenAI-compatible API.
const openAIBase = "/openai/v1"

// withOpenAI sends /openai and everything under it to openai, the rest to native. A prefix
// test rather than an http.ServeMux, whose path cleaning and redirects would change what the
// native routes see.
func withOpenAI(openai, native http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/openai" || strings.HasPrefix(r.URL.Path, "/openai/") {
			openai.ServeHTTP(w, r)
			return
		}
		native.ServeHTTP(w, r)
	})
}

// openAI serves the OpenAI-compatible routes over an OrchestratorService client.
type openAI struct {
	orch orchestratorv1.OrchestratorServiceClient
	// now is the clock of the "created" fields.
	now func() time.Time
}

func newOpenAI(orch orchestratorv1.OrchestratorServiceClient) *openAI {
	return &openAI{orch: orch, now: time.Now}
}

func (o *openAI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	switch {
	case path == openAIBase+"/chat/completions":
		if allowOnly(w, r, http.MethodPost) {
			o.generate(w, r, chatAPI)
		}
	case path == openAIBase+"/completions":
		if allowOnly(w, r, http.MethodPost) {
			o.generate(w, r, completionAPI)
		}
	case path == openAIBase+"/models":
		if allowOnly(w, r, http.MethodGet) {
			o.models(w, r, "")
		}
	case strings.HasPrefix(path, openAIBase+"/models/") && len(path) > len(openAIBase+"/models/"):
		if allowOnly(w, r, http.MethodGet) {
			o.models(w, r, strings.TrimPrefix(path, openAIBase+"/models/"))
		}
	default:
		writeAPIError(w, &apiError{
			status:  http.StatusNotFound,
			message: fmt.Sprintf("Invalid URL (%s %s)", r.Method, path),
			kind:    "invalid_request_error",
			code:    "unknown_url",
		})
	}
}

func allowOnly(w http.ResponseWriter, r *http.Request, method string) bool {
	if r.Method == method {
		return true
	}
	w.Header().Set("Allow", method)
	writeAPIError(w, &apiError{
		status:  http.StatusMethodNotAllowed,
		message: fmt.Sprintf("%s %s is not allowed: use %s", r.Method, r.URL.Path, method),
		kind:    "invalid_request_error",
		code:    "method_not_allowed",
	})
	return false
}

// outgoing is the request's context (so that the client going away cancels the call) with the
// headers the orchestrator reads as gRPC metadata of the same names, as the native routes pass
// them: the API key and the correlation and trace ids.
func outgoing(r *http.Request) context.Context {
	md := metadata.MD{}
	for _, v := range r.Header.Values("Authorization") {
		md.Append("authorization", v)
	}
	for name := range passedHeaders {
		for _, v := range r.Header.Values(name) {
			md.Append(name, v)
		}
	}
	return metadata.NewOutgoingContext(r.Context(), md)
}

// echoCorrelation sets X-Correlation-Id from the orchestrator's response metadata (the header;
// the trailer of a call that failed before sending one).
func echoCorrelation(w http.ResponseWriter, mds ...metadata.MD) {
	for _, md := range mds {
		if v := md.Get("x-correlation-id"); len(v) > 0 {
			w.Header().Set("X-Correlation-Id", v[0])
			return
		}
	}
}

// --- Models -------------------------------------------------------------------------------

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

type modelList struct {
	Object string        `json:"object"`
	Data   []modelObject `json:"data"`
}

// models answers the model list, or the one model id (OrchestratorService has no call for one
// served model: it is looked up in the list, which already holds only what the key may use).
func (o *openAI) models(w http.ResponseWriter, r *http.Request, id string) {
	var header, trailer metadata.MD
	resp, err := o.orch.ListModels(outgoing(r), &orchestratorv1.ListModelsRequest{},
		grpc.Header(&header), grpc.Trailer(&trailer))
	echoCorrelation(w, header, trailer)
	if err != nil {
		writeAPIError(w, apiErrorOf(err, nil))
		return
	}
	list := modelList{Object: "list", Data: []modelObject{}}
	for _, m := range resp.GetModels() {
		list.Data = append(list.Data, modelObject{
			ID:      m.GetModelId(),
			Object:  "model",
			Created: m.GetCreatedUnixMs() / 1000,
			OwnedBy: "llama-orch",
		})
	}
	if id == "" {
		writeJSON(w, http.StatusOK, list)
		return
	}
	for _, m := range list.Data {
		if m.ID == id {
			writeJSON(w, http.StatusOK, m)
			return
		}
	}
	writeAPIError(w, &apiError{
		status:  http.StatusNotFound,
		message: fmt.Sprintf("The model %q does not exist or you do not have access to it.", id),
		kind:    "invalid_request_error",
		param:   "model",
		code:    "model_not_found",
	})
}

// --- Requests -----------------------------------------------------------------------------

// commonFields are the request fields chat and completions share.
type commonFields struct {
	Model         string `json:"model"`
	Stream        bool   `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	MaxTokens        *int64                     `json:"max_tokens"`
	Temperature      *float64                   `json:"temperature"`
	TopP             *float64                   `json:"top_p"`
	Seed             *int64                     `json:"seed"`
	Stop             json.RawMessage            `json:"stop"`
	ResponseFormat   *responseFormat            `json:"response_format"`
	N                *int64                     `json:"n"`
	PresencePenalty  *float64                   `json:"presence_penalty"`
	FrequencyPenalty *float64                   `json:"frequency_penalty"`
	LogitBias        map[string]json.RawMessage `json:"logit_bias"`
	// Our extras, as extra body keys.
	TopK      *int64  `json:"top_k"`
	Priority  *string `json:"priority"`
	IgnoreEOS bool    `json:"ignore_eos"`
}

type responseFormat struct {
	Type       string `json:"type"`
	JSONSchema *struct {
		Name   string          `json:"name"`
		Schema json.RawMessage `json:"schema"`
		// Strict is accepted and changes nothing: the grammar always enforces the schema.
		Strict *bool `json:"strict"`
	} `json:"json_schema"`
}

// chatRequest and completionRequest are the fields of one endpoint; the body is decoded into
// them and into commonFields (not embedded in them: a type error would name the embedded
// struct in its path).
type chatRequest struct {
	Messages            []json.RawMessage `json:"messages"`
	MaxCompletionTokens *int64            `json:"max_completion_tokens"`
	Tools               json.RawMessage   `json:"tools"`
	ToolChoice          json.RawMessage   `json:"tool_choice"`
	Functions           json.RawMessage   `json:"functions"`
	FunctionCall        json.RawMessage   `json:"function_call"`
	Logprobs            *bool             `json:"logprobs"`
	TopLogprobs         *int64            `json:"top_logprobs"`
}

type chatMessage struct {
	Role      *string         `json:"role"`
	Content   json.RawMessage `json:"content"`
	ToolCalls json.RawMessage `json:"tool_calls"`
}

type contentPart struct {
	Type string  `json:"type"`
	Text *string `json:"text"`
}

type completionRequest struct {
	Prompt   json.RawMessage `json:"prompt"`
	Logprobs *int64          `json:"logprobs"`
	Echo     bool            `json:"echo"`
	BestOf   *int64          `json:"best_of"`
	Suffix   *string         `json:"suffix"`
}

// generation is an OpenAI request as a GenerateRequest, with what its answer needs.
type generation struct {
	req          *orchestratorv1.GenerateRequest
	stream       bool
	includeUsage bool
	// maxTokensParam is the name the token limit came under, to name it in errors.
	maxTokensParam string
}

var chatRoles = map[string]orchestratorv1.Role{
	"system":    orchestratorv1.Role_ROLE_SYSTEM,
	"developer": orchestratorv1.Role_ROLE_SYSTEM, // OpenAI's newer name for system
	"user":      orchestratorv1.Role_ROLE_USER,
	"assistant": orchestratorv1.Role_ROLE_ASSISTANT,
	"tool":      orchestratorv1.Role_ROLE_TOOL,
}

func parseChat(body []byte) (*generation, *apiError) {
	var common commonFields
	var c chatRequest
	if e := decodeBody(body, &common, &c); e != nil {
		return nil, e
	}
	for _, key := range []struct {
		name  string
		value json.RawMessage
		noop  func(json.RawMessage) bool
	}{
		{"tools", c.Tools, isEmptyList},
		{"functions", c.Functions, isEmptyList},
		{"tool_choice", c.ToolChoice, isNoToolChoice},
		{"function_call", c.FunctionCall, isNoToolChoice},
	} {
		if !isNull(key.value) && !key.noop(key.value) {
			return nil, unsupported(key.name, "tool calling is not supported yet")
		}
	}
	if c.Logprobs != nil && *c.Logprobs {
		return nil, unsupported("logprobs", "logprobs are not supported")
	}
	if c.TopLogprobs != nil && *c.TopLogprobs != 0 {
		return nil, unsupported("top_logprobs", "logprobs are not supported")
	}
	maxTokens, maxTokensParam := common.MaxTokens, "max_tokens"
	if c.MaxCompletionTokens != nil {
		maxTokens, maxTokensParam = c.MaxCompletionTokens, "max_completion_tokens"
	}
	g, e := common.generation(maxTokens, maxTokensParam)
	if e != nil {
		return nil, e
	}
	if c.Messages == nil {
		return nil, missing("messages")
	}
	if len(c.Messages) == 0 {
		return nil, invalid("messages", "invalid_value", "messages must hold at least one message")
	}
	for i, raw := range c.Messages {
		m, e := parseMessage(i, raw)
		if e != nil {
			return nil, e
		}
		g.req.Messages = append(g.req.Messages, m)
	}
	return g, nil
}

func parseMessage(i int, raw json.RawMessage) (*orchestratorv1.ChatMessage, *apiError) {
	at := fmt.Sprintf("messages[%d]", i)
	var m chatMessage
	if e := decodeAt(raw, &m, at); e != nil {
		return nil, e
	}
	if m.Role == nil {
		return nil, missing(at + ".role")
	}
	role, ok := chatRoles[*m.Role]
	if !ok {
		return nil, invalid(at+".role", "invalid_value",
			"%s.role %q is not one of system, developer, user, assistant, tool", at, *m.Role)
	}
	if !isNull(m.ToolCalls) && !isEmptyList(m.ToolCalls) {
		return nil, unsupported(at+".tool_calls", "tool calling is not supported yet")
	}
	content, e := parseContent(at+".content", m.Content)
	if e != nil {
		return nil, e
	}
	return &orchestratorv1.ChatMessage{Role: role, Content: content}, nil
}

// parseContent reads a message's content: a string, null (an assistant turn without text), or
// a list of parts of which only text parts are served, joined with "\n" as vLLM does, so that
// parts a client split a message into stay apart.
func parseContent(at string, raw json.RawMessage) (string, *apiError) {
	if isNull(raw) {
		return "", nil
	}
	var text string
	if json.Unmarshal(raw, &text) == nil {
		return text, nil
	}
	var parts []json.RawMessage
	if json.Unmarshal(raw, &parts) != nil {
		return "", invalid(at, "invalid_type", "%s must be a string or a list of content parts", at)
	}
	texts := make([]string, 0, len(parts))
	for j, rawPart := range parts {
		var p contentPart
		if e := decodeAt(rawPart, &p, fmt.Sprintf("%s[%d]", at, j)); e != nil {
			// Named by the content it belongs to, as other faults of a part are.
			e.param = at
			return "", e
		}
		if p.Type != "text" {
			return "", invalid(at, "invalid_value",
				"%s[%d]: content parts of type %q are not supported, only text", at, j, p.Type)
		}
		if p.Text == nil {
			return "", invalid(at, "invalid_value", "%s[%d]: a text part needs its text", at, j)
		}
		texts = append(texts, *p.Text)
	}
	return strings.Join(texts, "\n"), nil
}

func parseCompletion(body []byte) (*generation, *apiError) {
	var common commonFields
	var c completionRequest
	if e := decodeBody(body, &common, &c); e != nil {
		return nil, e
	}
	switch {
	case c.Logprobs != nil:
		return nil, unsupported("logprobs", "logprobs are not supported")
	case c.Echo:
		return nil, unsupported("echo", "not supported")
	case c.BestOf != nil && *c.BestOf != 1:
		return nil, unsupported("best_of", "only 1 is supported (one completion per request)")
	case c.Suffix != nil && *c.Suffix != "":
		return nil, unsupported("suffix", "insertion is not supported")
	}
	g, e := common.generation(common.MaxTokens, "max_tokens")
	if e != nil {
		return nil, e
	}
	if isNull(c.Prompt) {
		return nil, missing("prompt")
	}
	var prompt string
	if json.Unmarshal(c.Prompt, &prompt) != nil {
		var prompts []string
		if json.Unmarshal(c.Prompt, &prompts) != nil || len(prompts) != 1 {
			return nil, invalid("prompt", "invalid_value",
				"prompt must be a string or a list of exactly one string (several prompts, or token ids, are not supported)")
		}
		prompt = prompts[0]
	}
	g.req.Prompt = prompt
	return g, nil
}

// generation maps the shared fields; maxTokens is the limit the endpoint's fields ask for.
func (c *commonFields) generation(maxTokens *int64, maxTokensParam string) (*generation, *apiError) {
	if c.Model == "" {
		return nil, missing("model")
	}
	switch {
	case c.N != nil && *c.N != 1:
		return nil, unsupported("n", "only 1 is supported (one choice per request)")
	case c.PresencePenalty != nil && *c.PresencePenalty != 0:
		return nil, unsupported("presence_penalty", "not supported")
	case c.FrequencyPenalty != nil && *c.FrequencyPenalty != 0:
		return nil, unsupported("frequency_penalty", "not supported")
	case len(c.LogitBias) > 0:
		return nil, unsupported("logit_bias", "not supported")
	}
	s := &commonv1.SamplingParams{IgnoreEos: c.IgnoreEOS}
	var e *apiError
	if s.MaxTokens, e = int32Of(maxTokensParam, maxTokens); e != nil {
		return nil, e
	}
	if s.TopK, e = int32Of("top_k", c.TopK); e != nil {
		return nil, e
	}
	if s.Temperature, e = float32Of("temperature", c.Temperature); e != nil {
		return nil, e
	}
	if s.TopP, e = float32Of("top_p", c.TopP); e != nil {
		return nil, e
	}
	if c.Seed != nil {
		s.Seed = proto.Uint32(seedOf(*c.Seed))
	}
	if s.Stop, e = stopOf(c.Stop); e != nil {
		return nil, e
	}
	req := &orchestratorv1.GenerateRequest{ModelId: c.Model, Sampling: s}
	if c.Priority != nil {
		switch *c.Priority {
		case "interactive":
			req.Priority = commonv1.Priority_PRIORITY_INTERACTIVE
		case "batch":
			req.Priority = commonv1.Priority_PRIORITY_BATCH
		default:
			return nil, invalid("priority", "invalid_value", "priority %q is not interactive or batch", *c.Priority)
		}
	}
	if req.ResponseFormat, e = formatOf(c.ResponseFormat); e != nil {
		return nil, e
	}
	return &generation{
		req:            req,
		stream:         c.Stream,
		includeUsage:   c.StreamOptions != nil && c.StreamOptions.IncludeUsage,
		maxTokensParam: maxTokensParam,
	}, nil
}

// seedOf maps OpenAI's seed, any integer (int64 here), to our uint32 seed: the seed modulo
// 2^32, which is its low 32 bits, so negative seeds wrap too (-1 is 4294967295). Seeds that
// agree modulo 2^32 then give the same tokens, which determinism (the same seed gives the same
// answer) does not mind.
func seedOf(seed int64) uint32 {
	return uint32(seed)
}

func int32Of(param string, v *int64) (*int32, *apiError) {
	if v == nil {
		return nil, nil
	}
	if *v < math.MinInt32 || *v > math.MaxInt32 {
		return nil, invalid(param, "invalid_value", "%s %d is out of range", param, *v)
	}
	return proto.Int32(int32(*v)), nil
}

func float32Of(param string, v *float64) (*float32, *apiError) {
	if v == nil {
		return nil, nil
	}
	f := float32(*v)
	if math.IsInf(float64(f), 0) {
		return nil, invalid(param, "invalid_value", "%s %g is out of range", param, *v)
	}
	return proto.Float32(f), nil
}

// stopOf reads stop: null, a string, or a list of strings. Their bounds (at most 8, each
// 1..256 bytes) are the orchestrator's to check.
func stopOf(raw json.RawMessage) ([]string, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []string{one}, nil
	}
	var list []string
	if json.Unmarshal(raw, &list) != nil {
		return nil, invalid("stop", "invalid_type", "stop must be a string or a list of strings")
	}
	return list, nil
}

func formatOf(f *responseFormat) (*orchestratorv1.ResponseFormat, *apiError) {
	if f == nil {
		return nil, nil
	}
	switch f.Type {
	case "text":
		return &orchestratorv1.ResponseFormat{Format: &orchestratorv1.ResponseFormat_Text{Text: &orchestratorv1.TextFormat{}}}, nil
	case "json_object":
		return &orchestratorv1.ResponseFormat{Format: &orchestratorv1.ResponseFormat_JsonObject{JsonObject: &orchestratorv1.JsonObjectFormat{}}}, nil
	case "json_schema":
	case "":
		return nil, missing("response_format.type")
	default:
		return nil, invalid("response_format.type", "invalid_value",
			"response_format.type %q is not text, json_object or json_schema", f.Type)
	}
	if f.JSONSchema == nil {
		return nil, missing("response_format.json_schema")
	}
	raw := bytes.TrimSpace(f.JSONSchema.Schema)
	if isNull(raw) {
		return nil, missing("response_format.json_schema.schema")
	}
	if raw[0] != '{' {
		return nil, invalid("response_format.json_schema.schema", "invalid_type",
			"response_format.json_schema.schema must be a JSON object")
	}
	// Compacted rather than decoded and marshalled again: a map would sort the keys, and the
	// order of properties is the order the grammar makes the model write them in.
	var schema bytes.Buffer
	if err := json.Compact(&schema, raw); err != nil {
		return nil, invalid("response_format.json_schema.schema", "invalid_value", "%v", err)
	}
	return &orchestratorv1.ResponseFormat{Format: &orchestratorv1.ResponseFormat_JsonSchema{JsonSchema: &orchestratorv1.JsonSchemaFormat{
		Schema: schema.String(),
		Name:   f.JSONSchema.Name,
	}}}, nil
}

func isNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

func isEmptyList(raw json.RawMessage) bool {
	var list []json.RawMessage
	return json.Unmarshal(raw, &list) == nil && len(list) == 0
}

// isNoToolChoice: "none", or "auto" (with no tools, there is nothing to choose).
func isNoToolChoice(raw json.RawMessage) bool {
	var choice string
	return json.Unmarshal(raw, &choice) == nil && (choice == "none" || choice == "auto")
}

// readBody reads the whole body (limitBody bounds it).
func readBody(r *http.Request) ([]byte, *apiError) {
	body, err := io.ReadAll(r.Body)
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return nil, invalid("", "request_too_large", "the request body is larger than %d bytes", tooLarge.Limit)
	case err != nil:
		return nil, invalid("", "invalid_body", "the request body could not be read: %v", err)
	}
	return body, nil
}

func decodeBody(body []byte, into ...any) *apiError {
	for _, v := range into {
		if e := decodeAt(body, v, ""); e != nil {
			return e
		}
	}
	return nil
}

// decodeAt decodes the JSON object at (a field path; "" for the body) into a struct, naming
// the field of a type error by its path.
func decodeAt(raw []byte, into any, at string) *apiError {
	err := json.Unmarshal(raw, into)
	if err == nil {
		return nil
	}
	var typeErr *json.UnmarshalTypeError
	if !errors.As(err, &typeErr) {
		return invalid(at, "invalid_json", "the request body is not valid JSON: %v", err)
	}
	field := typeErr.Field
	switch {
	case at != "" && field != "":
		field = at + "." + field
	case at != "":
		field = at
	}
	if field == "" {
		return invalid("", "invalid_type", "the request body must be a JSON object, not %s", typeErr.Value)
	}
	return invalid(field, "invalid_type", "%s must be %s, not %s", field, jsonKind(typeErr.Type), typeErr.Value)
}

// jsonKind names the JSON a Go type decodes from.
func jsonKind(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "a list"
	}
	return "an object"
}

// --- Answers ------------------------------------------------------------------------------

// api is what differs between chat completions and completions.
type api struct {
	parse       func([]byte) (*generation, *apiError)
	idPrefix    string
	object      string
	chunkObject string
	// startChoice opens a stream (nil: nothing opens it).
	startChoice func() any
	// tokenChoice and finishChoice are a stream's chunks; wholeChoice the answer's one choice.
	tokenChoice  func(text string) any
	finishChoice func(reason string) any
	wholeChoice  func(text, reason string) any
}

type chatDelta struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

type chatChunkChoice struct {
	Index        int       `json:"index"`
	Delta        chatDelta `json:"delta"`
	Logprobs     *struct{} `json:"logprobs"`
	FinishReason *string   `json:"finish_reason"`
}

type chatChoice struct {
	Index   int `json:"index"`
	Message struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"message"`
	Logprobs     *struct{} `json:"logprobs"`
	FinishReason string    `json:"finish_reason"`
}

type textChoice struct {
	Index        int       `json:"index"`
	Text         string    `json:"text"`
	Logprobs     *struct{} `json:"logprobs"`
	FinishReason *string   `json:"finish_reason"`
}

var chatAPI = &api{
	parse:       parseChat,
	idPrefix:    "chatcmpl-",
	object:      "chat.completion",
	chunkObject: "chat.completion.chunk",
	startChoice: func() any {
		return chatChunkChoice{Delta: chatDelta{Role: "assistant", Content: proto.String("")}}
	},
	tokenChoice: func(text string) any { return chatChunkChoice{Delta: chatDelta{Content: &text}} },
	finishChoice: func(reason string) any {
		return chatChunkChoice{FinishReason: &reason}
	},
	wholeChoice: func(text, reason string) any {
		c := chatChoice{FinishReason: reason}
		c.Message.Role, c.Message.Content = "assistant", text
		return c
	},
}

var completionAPI = &api{
	parse:        parseCompletion,
	idPrefix:     "cmpl-",
	object:       "text_completion",
	chunkObject:  "text_completion",
	tokenChoice:  func(text string) any { return textChoice{Text: text} },
	finishChoice: func(reason string) any { return textChoice{FinishReason: &reason} },
	wholeChoice: func(text, reason string) any {
		return textChoice{Text: text, FinishReason: &reason}
	},
}

type usage struct {
	PromptTokens        uint32        `json:"prompt_tokens"`
	CompletionTokens    uint32        `json:"completion_tokens"`
	TotalTokens         uint64        `json:"total_tokens"`
	PromptTokensDetails promptDetails `json:"prompt_tokens_details"`
}

// promptDetails says how many prompt tokens the worker's prefix cache held (not read again).
type promptDetails struct {
	CachedTokens uint32 `json:"cached_tokens"`
}

func usageOf(f *commonv1.Finished) *usage {
	return &usage{
		PromptTokens:        f.GetTokensIn(),
		CompletionTokens:    f.GetTokensOut(),
		TotalTokens:         uint64(f.GetTokensIn()) + uint64(f.GetTokensOut()),
		PromptTokensDetails: promptDetails{CachedTokens: f.GetTokensCached()},
	}
}

// completion is a whole answer, or (Object a chunk's) one chunk of a stream.
type completion struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	Model   string `json:"model"`
	Choices []any  `json:"choices"`
	// Usage is a *usage, or JSON null on the chunks of a stream with include_usage, or absent.
	Usage any `json:"usage,omitempty"`
}

// jsonNull marshals as null where omitempty would drop a nil.
type jsonNull struct{}

func (jsonNull) MarshalJSON() ([]byte, error) { return []byte("null"), nil }

func finishReasonOf(r commonv1.FinishReason) string {
	if r == commonv1.FinishReason_FINISH_REASON_LENGTH {
		return "length"
	}
	// STOP (end of sequence) and STOP_SEQUENCE (a stop string) are both OpenAI's "stop".
	return "stop"
}

// generate serves chat completions and completions: one Generate call, answered whole or as
// server-sent events.
func (o *openAI) generate(w http.ResponseWriter, r *http.Request, a *api) {
	body, e := readBody(r)
	if e != nil {
		writeAPIError(w, e)
		return
	}
	g, e := a.parse(body)
	if e != nil {
		writeAPIError(w, e)
		return
	}
	created := o.now().Unix()
	stream, err := o.orch.Generate(outgoing(r), g.req)
	if err != nil {
		writeAPIError(w, apiErrorOf(err, g))
		return
	}
	// Nothing is written before the first event or the error: an error before it is a
	// plain HTTP error, with its status and Retry-After.
	first, err := stream.Recv()
	header, _ := stream.Header()
	if err != nil {
		echoCorrelation(w, header, stream.Trailer())
		writeAPIError(w, streamError(err, g))
		return
	}
	echoCorrelation(w, header)
	answer := completion{
		ID:      a.idPrefix + first.GetEvent().GetTaskId(),
		Created: created,
		Model:   g.req.GetModelId(),
	}
	if g.stream {
		o.streamAnswer(w, stream, first, g, a, answer)
	} else {
		o.wholeAnswer(w, stream, first, g, a, answer)
	}
}

// streamError is the error of a stream's Recv: a status, or io.EOF when the stream ended
// without finishing the task.
func streamError(err error, g *generation) *apiError {
	if errors.Is(err, io.EOF) {
		return &apiError{
			status:  http.StatusBadGateway,
			message: "the orchestrator ended the generation without finishing it",
			kind:    "server_error",
		}
	}
	return apiErrorOf(err, g)
}

func (o *openAI) wholeAnswer(w http.ResponseWriter, stream grpc.ServerStreamingClient[orchestratorv1.GenerateResponse],
	event *orchestratorv1.GenerateResponse, g *generation, a *api, answer completion) {
	var text strings.Builder
	for {
		switch kind := event.GetEvent().GetKind().(type) {
		case *orchestratorv1.TaskEvent_Token:
			text.WriteString(kind.Token.GetText())
		case *orchestratorv1.TaskEvent_Finished:
			drain(stream)
			answer.Object = a.object
			answer.Choices = []any{a.wholeChoice(text.String(), finishReasonOf(kind.Finished.GetFinishReason()))}
			answer.Usage = usageOf(kind.Finished)
			writeJSON(w, http.StatusOK, answer)
			return
		}
		var err error
		if event, err = stream.Recv(); err != nil {
			writeAPIError(w, streamError(err, g))
			return
		}
	}
}

func (o *openAI) streamAnswer(w http.ResponseWriter, stream grpc.ServerStreamingClient[orchestratorv1.GenerateResponse],
	event *orchestratorv1.GenerateResponse, g *generation, a *api, answer completion) {
	sse := startSSE(w)
	answer.Object = a.chunkObject
	if g.includeUsage {
		answer.Usage = jsonNull{}
	}
	chunk := func(choice any) bool {
		c := answer
		c.Choices = []any{choice}
		return sse.data(c)
	}
	// The stream opens (chat: the assistant's role) once the task leaves the queue.
	opened := a.startChoice == nil
	open := func() bool {
		if opened {
			return true
		}
		opened = true
		return chunk(a.startChoice())
	}
	for {
		ok := true
		switch kind := event.GetEvent().GetKind().(type) {
		case *orchestratorv1.TaskEvent_Queued:
			// Keep-alives for proxies and clients with read timeouts; SSE parsers skip them.
			ok = sse.comment(fmt.Sprintf("queued position %d", kind.Queued.GetPosition()))
		case *orchestratorv1.TaskEvent_Token:
			ok = open() && (kind.Token.GetText() == "" || chunk(a.tokenChoice(kind.Token.GetText())))
		case *orchestratorv1.TaskEvent_Finished:
			ok = open() && chunk(a.finishChoice(finishReasonOf(kind.Finished.GetFinishReason())))
			if ok && g.includeUsage {
				c := answer
				c.Choices = []any{}
				c.Usage = usageOf(kind.Finished)
				ok = sse.data(c)
			}
			if ok {
				sse.done()
			}
			drain(stream)
			return
		default: // started, metrics
			ok = open()
		}
		if !ok {
			return // the client is gone; returning cancels the call
		}
		var err error
		if event, err = stream.Recv(); err != nil {
			sse.data(streamError(err, g).body())
			return
		}
	}
}

// drain reads a finished stream to its end, so that the call ends with its status rather than
// being cancelled when the handler returns.
func drain(stream grpc.ServerStreamingClient[orchestratorv1.GenerateResponse]) {
	for {
		if _, err := stream.Recv(); err != nil {
			return
		}
	}
}

// sse writes server-sent events, each flushed as it is written.
type sse struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func startSSE(w http.ResponseWriter) *sse {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	w.WriteHeader(http.StatusOK)
	return &sse{w: w, rc: http.NewResponseController(w)}
}

func (s *sse) data(v any) bool { return s.write("data: " + string(marshalJSON(v)) + "\n\n") }

func (s *sse) comment(text string) bool { return s.write(": " + text + "\n\n") }

func (s *sse) done() bool { return s.write("data: [DONE]\n\n") }

// write reports whether the event reached the client's connection.
func (s *sse) write(event string) bool {
	if _, err := io.WriteString(s.w, event); err != nil {
		return false
	}
	err := s.rc.Flush()
	return err == nil || errors.Is(err, http.ErrNotSupported)
}

// --- Errors -------------------------------------------------------------------------------

// apiError is an error answer in OpenAI's shape.
type apiError struct {
	status  int
	message string
	// kind is OpenAI's error type: invalid_request_error, authentication_error, ...
	kind string
	// param names the field at fault; "" is null.
	param string
	// code is a short machine-readable reason; "" is null.
	code string
	// grpc is the status the error came from, for Retry-After.
	grpc *status.Status
}

type errorBody struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func (e *apiError) body() errorBody {
	var b errorBody
	b.Error.Message, b.Error.Type = e.message, e.kind
	if e.param != "" {
		b.Error.Param = &e.param
	}
	if e.code != "" {
		b.Error.Code = &e.code
	}
	return b
}

func invalid(param, code, format string, args ...any) *apiError {
	return &apiError{
		status:  http.StatusBadRequest,
		message: fmt.Sprintf(format, args...),
		kind:    "invalid_request_error",
		param:   param,
		code:    code,
	}
}

func missing(param string) *apiError {
	return invalid(param, "missing_required_parameter", "%s is required", param)
}

func unsupported(param, message string) *apiError {
	return invalid(param, "unsupported_parameter", "%s: %s", param, message)
}

// statusOfCode is the HTTP status and OpenAI error type of each gRPC code. CANCELLED is 499,
// as on the native routes (the task was cancelled, mostly by the client going away): not 408,
// which OpenAI's clients would retry.
var statusOfCode = map[codes.Code]struct {
	status int
	kind   string
}{
	codes.Canceled:           {499, "cancelled"},
	codes.Unknown:            {http.StatusInternalServerError, "server_error"},
	codes.InvalidArgument:    {http.StatusBadRequest, "invalid_request_error"},
	codes.DeadlineExceeded:   {http.StatusGatewayTimeout, "server_error"},
	codes.NotFound:           {http.StatusNotFound, "invalid_request_error"},
	codes.AlreadyExists:      {http.StatusConflict, "invalid_request_error"},
	codes.PermissionDenied:   {http.StatusForbidden, "permission_error"},
	codes.ResourceExhausted:  {http.StatusTooManyRequests, "rate_limit_error"},
	codes.FailedPrecondition: {http.StatusBadRequest, "invalid_request_error"},
	codes.Aborted:            {http.StatusConflict, "server_error"},
	codes.OutOfRange:         {http.StatusBadRequest, "invalid_request_error"},
	codes.Unimplemented:      {http.StatusNotImplemented, "server_error"},
	codes.Internal:           {http.StatusInternalServerError, "server_error"},
	codes.Unavailable:        {http.StatusServiceUnavailable, "server_error"},
	codes.DataLoss:           {http.StatusInternalServerError, "server_error"},
	codes.Unauthenticated:    {http.StatusUnauthorized, "authentication_error"},
}

// apiErrorOf is a failed call's answer. g is the generation the call ran (nil for ListModels),
// to name its fields by the names the client sent.
func apiErrorOf(err error, g *generation) *apiError {
	st := status.Convert(err)
	mapped, ok := statusOfCode[st.Code()]
	if !ok {
		mapped.status, mapped.kind = http.StatusInternalServerError, "server_error"
	}
	e := &apiError{status: mapped.status, kind: mapped.kind, message: st.Message(), grpc: st}
	if e.message == "" {
		e.message = st.Code().String()
	}
	reason := ""
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			if reason == "" {
				reason = d.GetReason()
			}
		case *errdetails.BadRequest:
			if v := d.GetFieldViolations(); e.param == "" && len(v) > 0 {
				e.param = openAIField(v[0].GetField(), g)
			}
		}
	}
	e.code = strings.ToLower(reason)
	// The model is at fault when a reason says so (MODEL_NOT_FOUND, MODEL_NOT_ALLOWED,
	// MODEL_RETIRED), and for a generation's NOT_FOUND: the model is the only id it names.
	if e.param == "" && (strings.HasPrefix(reason, "MODEL_") || (g != nil && st.Code() == codes.NotFound)) {
		e.param = "model"
	}
	return e
}

// openAIField names one of our request fields as the OpenAI request that became it did.
func openAIField(field string, g *generation) string {
	switch {
	case field == "model_id":
		return "model"
	case field == "sampling.max_tokens" && g != nil:
		return g.maxTokensParam
	case strings.HasPrefix(field, "sampling."):
		return strings.TrimPrefix(field, "sampling.")
	}
	return field // prompt, messages[i].content, response_format..., priority: the same
}

func writeAPIError(w http.ResponseWriter, e *apiError) {
	if e.grpc != nil {
		setRetryAfter(w, e.grpc)
	}
	writeJSON(w, e.status, e.body())
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(marshalJSON(v), '\n'))
}

// marshalJSON is v as JSON, with <, > and & as themselves (generated text is full of them).
func marshalJSON(v any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v) // only this file's types reach it, and they have nothing that fails
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}
