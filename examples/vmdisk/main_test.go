package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/nbd"
)

// The example builds the disks and serves them, resetting vm3 under its
// connected client; an NBD client reads each VM's own data, and the
// snapshot export refuses writes.
func TestVMDisk(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out bytes.Buffer
	checked := make(chan error, 1)
	err := run(ctx, &out, t.TempDir(), "127.0.0.1:0", func(addr net.Addr) {
		go func() { checked <- check(ctx, cancel, addr) }()
	})
	require.NoError(t, err)
	require.NoError(t, <-checked)
	t.Log("\n" + out.String())
	require.Contains(t, out.String(), "imported golden.img: 64 MiB, 64 KiB stored")
	require.Contains(t, out.String(), `vm1 after the rollback: "golden OS image v1"`)
	require.Contains(t, out.String(), `golden:     64 MiB, block 0: "golden OS image v1"   at 1 MiB: ""`)
	require.Contains(t, out.String(), `vm2:        96 MiB, block 0: "golden OS image v1"   at 1 MiB: "hostname: vm2"`)
	require.Contains(t, out.String(), `vm1-data: 2048 MiB, block 0: "vm1 data disk"        at 1 MiB: ""`)
	require.Contains(t, out.String(), `vm3 over NBD before the reset: "vm3 OS, drifted"`)
	require.Contains(t, out.String(), `vm3 over NBD after the reset:  "golden OS image v1" (same connection)`)
	require.Contains(t, out.String(), `vm3:        64 MiB, block 0: "golden OS image v1"   at 1 MiB: ""`, "vm3 was reset to golden")
	require.Contains(t, out.String(), `delete golden: snapshot: volume is protected: "golden" is protected (dependants: vm1-before-upgrade, vm1, vm2, vm3)`)
}

// check reads every export through an NBD client, then stops the server.
func check(ctx context.Context, cancel func(), addr net.Addr) error {
	defer cancel()
	for name, want := range map[string]string{"vm1": "hostname: vm1", "vm2": "hostname: vm2", "vm3": "", "golden": "", "vm1-data": ""} {
		c, err := nbd.Dial(ctx, nbd.URI(addr, name))
		if err != nil {
			return err
		}
		got, err := get(c, 1<<20)
		c.Close()
		if err != nil {
			return err
		}
		if got != want {
			return &mismatch{name, got, want}
		}
	}
	d, err := nbd.Dial(ctx, nbd.URI(addr, "vm1-data"))
	if err != nil {
		return err
	}
	size := d.Size()
	d.Close()
	if size != 2<<30 {
		return &mismatch{"vm1-data", fmt.Sprint(size), "2 GiB"}
	}
	c, err := nbd.Dial(ctx, nbd.URI(addr, "vm1-before-upgrade"))
	if err != nil {
		return err
	}
	defer c.Close()
	if err := put(c, 0, "x"); err == nil {
		return &mismatch{"vm1-before-upgrade", "writable", "read-only"}
	}
	return nil
}

type mismatch struct{ name, got, want string }

func (m *mismatch) Error() string { return m.name + ": got " + m.got + ", want " + m.want }
