package nbd_test

import (
	"context"
	"fmt"
	"log"
	"net"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/nbd"
)

// Export a RAM disk over NBD and use it through the package's own client,
// as qemu-img, nbdcopy or QEMU would use it through the printed URI.
func Example() {
	disk, err := blockdev.NewMem(64<<20, 512)
	if err != nil {
		log.Fatal(err)
	}
	srv, err := nbd.New(nbd.Options{}, nbd.Export{Name: "disk", Device: disk})
	if err != nil {
		log.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()

	c, err := nbd.Dial(context.Background(), nbd.URI(l.Addr(), "disk"))
	if err != nil {
		log.Fatal(err)
	}
	block := make([]byte, 4096)
	copy(block, "hello, nbd")
	if _, err := c.WriteAt(block, 1<<20); err != nil {
		log.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		log.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := c.ReadAt(got, 1<<20); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s, %d MiB, multi-conn %v\n", got[:10], c.Size()>>20, c.Info().MultiConn)
	c.Close()

	stop() // graceful: drains requests in flight and flushes
	if err := <-served; err != nil {
		log.Fatal(err)
	}
	// Output: hello, nbd, 64 MiB, multi-conn true
}

// Delete a volume safely: withdraw its export, close the connections on
// it (waiting until none of their requests is on the device), then the
// device is the caller's again. The counters show what was served.
func ExampleServer_CloseExport() {
	disk, err := blockdev.NewMem(1<<20, 4096)
	if err != nil {
		log.Fatal(err)
	}
	srv, err := nbd.New(nbd.Options{}, nbd.Export{Name: "vm1", Device: disk})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go srv.Serve(context.Background(), l)
	c, err := nbd.Dial(context.Background(), nbd.URI(l.Addr(), "vm1"))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	// Sub-block writes are served: the client's block size is 512.
	if _, err := c.WriteAt(make([]byte, 512), 512); err != nil {
		log.Fatal(err)
	}
	e := srv.Stats().Exports[0]
	fmt.Printf("%s: %d connection, %d request, %d bytes written\n", e.Name, e.Connections, e.Requests, e.BytesWritten)

	if err := srv.Remove("vm1"); err != nil {
		log.Fatal(err)
	}
	n, err := srv.CloseExport(context.Background(), "vm1")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("closed", n)
	_, err = c.ReadAt(make([]byte, 512), 0)
	fmt.Println("client sees an error:", err != nil)
	// Output:
	// vm1: 1 connection, 1 request, 512 bytes written
	// closed 1
	// client sees an error: true
}
