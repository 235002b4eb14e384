// Runs containerd 1.6's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite) against a
// snapshotter reached over containerd's snapshots gRPC API, exactly as
// containerd reaches a proxy plugin.
//
// Two targets:
//   - default: `$LAZYPULL_BIN snapshotter --root <root>/state --address <root>/s.sock`,
//     a fresh process per test;
//   - CONFORMANCE_TARGET=overlay: containerd's own overlay snapshotter served
//     in-process over a unix socket (contrib/snapshotservice), the baseline
//     that tells which tests this kernel lets pass.
//
// Built offline in GOPATH mode against Debian's containerd sources; see
// crates/lazypull/tests/snapshotter_conformance.rs. By hand (as root):
//
//	G=$(mktemp -d); mkdir -p $G/src/conformance; cp go/conformance/*.go $G/src/conformance/
//	(cd $G/src/conformance && GO111MODULE=off GOPATH=$G:/usr/share/gocode \
//	    GOCACHE=$G/cache HOME=$G go test -c -o $G/conformance.test .)
//	CONFORMANCE_TARGET=overlay $G/conformance.test -test.v -test.root
//	LAZYPULL_BIN=target/debug/lazypull $G/conformance.test -test.v -test.root
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// dial connects the way containerd connects to a proxy plugin
// (services/server.proxyClients.getClient): target "unix://<path>", which
// makes grpc send ":authority: localhost" (a bare path is no valid HTTP/2
// authority), and containerd's unix dialer.
func dial(ctx context.Context, sock string) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return grpc.DialContext(ctx, dialer.DialAddress(sock),
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(dialer.ContextDialer),
	)
}

// waitSocket waits until something accepts connections on sock, or the
// process exits, or the deadline passes.
func waitSocket(sock string, exited <-chan error) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("snapshotter exited before listening on %s: %v", sock, err)
		default:
		}
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("snapshotter did not listen on %s within 10s", sock)
}

func lazypull(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	bin := os.Getenv("LAZYPULL_BIN")
	if bin == "" {
		return nil, nil, fmt.Errorf("LAZYPULL_BIN is not set (path of the lazypull binary)")
	}
	sock := filepath.Join(root, "s.sock")
	cmd := exec.Command(bin, "snapshotter", "--root", filepath.Join(root, "state"), "--address", sock)
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Kill()
		<-exited
		return nil
	}
	if err := waitSocket(sock, exited); err != nil {
		stop()
		return nil, nil, err
	}
	conn, err := dial(ctx, sock)
	if err != nil {
		stop()
		return nil, nil, fmt.Errorf("dial %s: %w", sock, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazypull")
	return sn, func() error {
		conn.Close()
		return stop()
	}, nil
}

func containerdOverlay(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	inner, err := overlay.NewSnapshotter(filepath.Join(root, "state"))
	if err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(root, "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		inner.Close()
		return nil, nil, err
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(inner))
	done := make(chan struct{})
	go func() { _ = srv.Serve(l); close(done) }()
	conn, err := dial(ctx, sock)
	if err != nil {
		srv.Stop()
		inner.Close()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "overlay")
	return sn, func() error {
		conn.Close()
		srv.Stop()
		<-done
		return inner.Close()
	}, nil
}

func TestSnapshotter(t *testing.T) {
	testutil.RequiresRoot(t)
	if os.Getenv("CONFORMANCE_TARGET") == "overlay" {
		testsuite.SnapshotterSuite(t, "overlay", containerdOverlay)
		return
	}
	testsuite.SnapshotterSuite(t, "lazypull", lazypull)
}
