package edge

import (
	"fmt"
	"log/slog"
	"os"

	"google.golang.org/grpc/grpclog"
)

// slogGRPC is grpclog's logger as JSON lines through slog, so that what gRPC and grpc-gateway
// report (a client that hung up mid-stream, a backend that cannot be reached) is in the same
// format as the edge's own lines. Info is dropped: gRPC's is connection chatter.
type slogGRPC struct{ log *slog.Logger }

// LogGRPCWith makes gRPC's and grpc-gateway's log lines go to log.
func LogGRPCWith(log *slog.Logger) {
	grpclog.SetLoggerV2(slogGRPC{log.With("source", "grpc")})
}

func (slogGRPC) Info(...any)                   {}
func (slogGRPC) Infoln(...any)                 {}
func (slogGRPC) Infof(string, ...any)          {}
func (l slogGRPC) Warning(args ...any)         { l.log.Warn(fmt.Sprint(args...)) }
func (l slogGRPC) Warningln(args ...any)       { l.log.Warn(fmt.Sprintln(args...)) }
func (l slogGRPC) Warningf(f string, a ...any) { l.log.Warn(fmt.Sprintf(f, a...)) }
func (l slogGRPC) Error(args ...any)           { l.log.Error(fmt.Sprint(args...)) }
func (l slogGRPC) Errorln(args ...any)         { l.log.Error(fmt.Sprintln(args...)) }
func (l slogGRPC) Errorf(f string, a ...any)   { l.log.Error(fmt.Sprintf(f, a...)) }
func (l slogGRPC) Fatal(args ...any)           { l.Error(args...); os.Exit(1) }
func (l slogGRPC) Fatalln(args ...any)         { l.Errorln(args...); os.Exit(1) }
func (l slogGRPC) Fatalf(f string, a ...any)   { l.Errorf(f, a...); os.Exit(1) }
func (slogGRPC) V(level int) bool              { return level <= 0 }
