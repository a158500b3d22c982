// Command nbdserve exports a file or a RAM disk over NBD, so that QEMU,
// qemu-img, nbdcopy, nbdfuse or fio can use it:
//
//	go run ./examples/nbdserve -listen 127.0.0.1:10809 -mem 64MiB
//	go run ./examples/nbdserve -socket /tmp/nbd.sock -file disk.img -readonly
//
// It prints the URI it serves on stdout once it accepts connections, and
// on SIGINT or SIGTERM stops gracefully: requests in flight are answered
// and the export is flushed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/nbd"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "nbdserve:", err)
		os.Exit(1)
	}
}

// run serves until ctx ends, after printing the URI on stdout.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("nbdserve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "", "TCP address to listen on (default 127.0.0.1:10809 unless -socket)")
	socket := fs.String("socket", "", "Unix socket path to listen on")
	file := fs.String("file", "", "export this file or block device")
	mem := fs.String("mem", "", "export a RAM disk of this size (such as 64MiB)")
	name := fs.String("name", "default", "export name (the empty name also selects it)")
	readOnly := fs.Bool("readonly", false, "export read-only")
	bs := fs.Int("blocksize", 0, "logical block size, 512 or 4096 (default: 512 for -mem, the file's for -file)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if (*file == "") == (*mem == "") {
		return errors.New("exactly one of -file and -mem is needed")
	}
	dev, err := openDevice(*file, *mem, *bs, *readOnly)
	if err != nil {
		return err
	}
	defer dev.Close()

	network, addr := "tcp", *listen
	switch {
	case *socket != "" && *listen != "":
		return errors.New("-listen and -socket exclude each other")
	case *socket != "":
		network, addr = "unix", *socket
		os.Remove(*socket) // a stale socket from an earlier run
	case addr == "":
		addr = "127.0.0.1:" + nbd.DefaultPort
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	srv, err := nbd.New(nbd.Options{Logger: logger},
		nbd.Export{Name: *name, Description: "blocksnap nbdserve", Device: dev, ReadOnly: *readOnly})
	if err != nil {
		return err
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return err
	}
	if network == "unix" {
		defer os.Remove(addr)
	}
	fmt.Fprintln(stdout, nbd.URI(l.Addr(), *name))
	return srv.Serve(ctx, l)
}

func openDevice(file, mem string, bs int, readOnly bool) (blockdev.Device, error) {
	if file != "" {
		return blockdev.Open(file, blockdev.FileOptions{ReadOnly: readOnly, BlockSize: bs})
	}
	size, err := parseSize(mem)
	if err != nil {
		return nil, err
	}
	if bs == 0 {
		bs = 512
	}
	return blockdev.NewMem(size, bs)
}

// parseSize reads sizes such as 4096, 64MiB, 64M, 1GiB, 2G (binary
// multiples; KB, MB, GB and TB are decimal).
func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}, {"B", 1},
	}
	mult := int64(1)
	num := strings.TrimSpace(s)
	for _, u := range units {
		if strings.HasSuffix(strings.ToUpper(num), strings.ToUpper(u.suffix)) {
			num, mult = strings.TrimSpace(num[:len(num)-len(u.suffix)]), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}
