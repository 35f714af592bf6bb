// Command llorch-gateway is the REST edge of llama-orch (package edge): it serves HTTP/JSON and
// forwards each call to the orchestrator over gRPC.
//
// Every flag can also be set by an environment variable, LLORCH_GATEWAY_<FLAG> (upper case,
// dashes as underscores); a flag on the command line wins. Like every llama-orch service it
// refuses to listen off loopback in plaintext, and refuses to send API keys to a non-loopback
// orchestrator without TLS.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"llama-orch/gateway/edge"
)

type config struct {
	listen       string
	orchestrator string
	catalog      string
	ca           string
	tlsName      string
	serveCert    string
	serveKey     string
	// stopOnStdinClose: a parent that holds our stdin (llorch up) is gone when it closes.
	stopOnStdinClose bool
	// check: validate the flags and read the files, then exit (for deploy checks).
	check bool
}

func parseConfig(args []string) (config, error) {
	var c config
	fs := flag.NewFlagSet("llorch-gateway", flag.ContinueOnError)
	str := func(p *string, name, value, usage string) {
		env := "LLORCH_GATEWAY_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok {
			value = v
		}
		fs.StringVar(p, name, value, usage+" ($"+env+")")
	}
	str(&c.listen, "listen", "127.0.0.1:8080", "host:port the REST edge listens on (port 0: any free port)")
	str(&c.orchestrator, "orchestrator", "127.0.0.1:50051", "host:port of the orchestrator")
	str(&c.catalog, "catalog", "", "host:port of the catalog, to serve its REST routes too (home profile only: over TLS the catalog takes certificates, not API keys)")
	str(&c.ca, "ca", "", "CA certificate (PEM) the orchestrator's certificate must chain to; set: TLS to the orchestrator")
	str(&c.tlsName, "tls-name", "", "name the orchestrator's certificate must carry (default: the host of -orchestrator)")
	str(&c.serveCert, "serve-cert", "", "certificate chain (PEM) to serve HTTPS with; required off loopback")
	str(&c.serveKey, "serve-key", "", "private key (PEM) of -serve-cert")
	fs.BoolVar(&c.check, "check", false, "check the flags and the certificate files, print what would run, and exit")
	fs.BoolVar(&c.stopOnStdinClose, "stop-on-stdin-close", false, "stop when standard input closes (for a parent process that starts the edge and may die without stopping it)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if (c.serveCert == "") != (c.serveKey == "") {
		return c, errors.New("-serve-cert and -serve-key go together")
	}
	for name, addr := range map[string]string{"-listen": c.listen, "-orchestrator": c.orchestrator, "-catalog": c.catalog} {
		if addr == "" && name == "-catalog" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return c, fmt.Errorf("%s %q: %v", name, addr, err)
		}
	}
	if !isLoopback(c.listen) && c.serveCert == "" {
		return c, fmt.Errorf("-listen %s is not loopback: serve HTTPS (-serve-cert, -serve-key) so API keys and prompts are not sent in the clear", c.listen)
	}
	if !isLoopback(c.orchestrator) && c.ca == "" {
		return c, fmt.Errorf("-orchestrator %s is not loopback: give -ca so API keys and prompts go over TLS", c.orchestrator)
	}
	if c.catalog != "" && !isLoopback(c.catalog) {
		return c, fmt.Errorf("-catalog %s is not loopback: the catalog's routes are for the home profile, where every service is on loopback", c.catalog)
	}
	if c.catalog != "" && c.ca != "" {
		return c, errors.New("-catalog goes with a plaintext (home profile) orchestrator: over TLS the catalog takes client certificates, which the edge must not lend to every REST caller")
	}
	return c, nil
}

func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func backendCredentials(c config) (credentials.TransportCredentials, error) {
	if c.ca == "" {
		return insecure.NewCredentials(), nil
	}
	pem, err := os.ReadFile(c.ca)
	if err != nil {
		return nil, fmt.Errorf("-ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("-ca %s: no PEM certificate in it", c.ca)
	}
	name := c.tlsName
	if name == "" {
		name, _, _ = net.SplitHostPort(c.orchestrator)
	}
	return credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: name, MinVersion: tls.VersionTLS12}), nil
}

// checkFiles reads every file the flags name, as serving would; it returns the credentials
// for the backends.
func checkFiles(c config) (credentials.TransportCredentials, error) {
	creds, err := backendCredentials(c)
	if err != nil {
		return nil, err
	}
	if c.serveCert != "" {
		if _, err := tls.LoadX509KeyPair(c.serveCert, c.serveKey); err != nil {
			return nil, fmt.Errorf("-serve-cert/-serve-key: %w", err)
		}
	}
	return creds, nil
}

func run(ctx context.Context, c config, log *slog.Logger) error {
	creds, err := checkFiles(c)
	if err != nil {
		return err
	}
	var backends edge.Backends
	if backends.Orchestrator, err = grpc.NewClient(c.orchestrator, grpc.WithTransportCredentials(creds)); err != nil {
		return fmt.Errorf("-orchestrator: %w", err)
	}
	defer backends.Orchestrator.Close()
	if c.catalog != "" {
		if backends.Catalog, err = grpc.NewClient(c.catalog, grpc.WithTransportCredentials(creds)); err != nil {
			return fmt.Errorf("-catalog: %w", err)
		}
		defer backends.Catalog.Close()
	}
	handler, err := edge.NewHandler(ctx, backends, log)
	if err != nil {
		return err
	}
	listener, err := net.Listen("tcp", c.listen)
	if err != nil {
		return fmt.Errorf("-listen: %w", err)
	}
	server := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	scheme := "http"
	if c.serveCert != "" {
		scheme = "https"
	}
	log.Info("listening", "url", fmt.Sprintf("%s://%s", scheme, listener.Addr()), "orchestrator", c.orchestrator, "tls", c.ca != "")
	served := make(chan error, 1)
	go func() {
		if c.serveCert != "" {
			served <- server.ServeTLS(listener, c.serveCert, c.serveKey)
		} else {
			served <- server.Serve(listener)
		}
	}()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	log.Info("stopping")
	// Streams in flight get a moment to end; after that they are cut, which cancels their tasks.
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := server.Shutdown(shutdown); err != nil {
		_ = server.Close()
	}
	return nil
}

func main() {
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil)).With("service", "gateway")
	edge.LogGRPCWith(log)
	c, err := parseConfig(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "llorch-gateway:", err)
		os.Exit(2)
	}
	if c.check {
		if _, err := checkFiles(c); err != nil {
			fmt.Fprintln(os.Stderr, "llorch-gateway:", err)
			os.Exit(2)
		}
		fmt.Printf("ok: REST on %s (HTTPS: %t) to orchestrator %s (TLS: %t)\n", c.listen, c.serveCert != "", c.orchestrator, c.ca != "")
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if c.stopOnStdinClose {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			log.Info("standard input closed: the parent is gone")
			stop()
		}()
	}
	if err := run(ctx, c, log); err != nil {
		log.Error("failed", "error", err.Error())
		os.Exit(1)
	}
}
