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
