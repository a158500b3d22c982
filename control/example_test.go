package control_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/blocksnap/blocksnap/control"
)

// A program drives a running server through its socket. Here the server is
// a toy that answers list; against `blocksnap serve --store STORE` the
// socket is STORE.control.
func Example() {
	dir, err := os.MkdirTemp("", "control-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "store.img.control")

	srv, err := control.Listen(path, func(_ context.Context, r control.Request) (any, error) {
		if r.Op == control.OpList {
			return []control.Volume{{ID: 1, Name: "origin", Kind: "origin", Size: 1 << 30}}, nil
		}
		return nil, fmt.Errorf("not served here: %s", r.Op)
	}, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()

	c := control.Dial(path)
	vols, err := c.List(context.Background())
	if err != nil {
		log.Fatal(err)
	}
	for _, v := range vols {
		fmt.Println(v.Name, v.Kind, v.Size)
	}
	_, err = c.Pause(context.Background())
	fmt.Println(err)
	// Output:
	// origin origin 1073741824
	// not served here: pause
}
