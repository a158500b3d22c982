package nbd

import (
	"bytes"
	"testing"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
	"github.com/stretchr/testify/require"
)

// FuzzHandshakeTLS runs the negotiation of a server with TLS on (the
// first input byte's low bit clear) or required (set), with an open export
// and one behind a client allow-list, over a plaintext stream: the gating
// of options before TLS, the allow-list checks and a STARTTLS whose TLS
// handshake meets garbage must end in replies or a closed connection,
// never a panic or a hang.
func FuzzHandshakeTLS(f *testing.F) {
	ca := newTestCA(f, "fuzz CA")
	dir := ca.certDir(f, true, "localhost")
	for _, s := range [][]byte{
		new(clientStream).flags(cflagFixedNewstyle).opt(optList, nil).opt(optInfo, infoData("vm")).
			opt(optGo, infoData("d")).readOnlyRequests().Bytes(),
		new(clientStream).flags(cflagFixedNewstyle).opt(optStructuredReply, nil).
			opt(optSetMetaContext, metaData("vm", metaBaseAllocation)).opt(optExportName, []byte("vm")).Bytes(),
		new(clientStream).flags(cflagFixedNewstyle).opt(optStartTLS, nil).opt(optStartTLS, nil).Bytes(),
		append(new(clientStream).flags(cflagFixedNewstyle).opt(optStartTLS, nil).Bytes(), 0x16, 3, 1, 0, 5, 1, 0, 0, 1, 0),
		new(clientStream).flags(0).opt(optStartTLS, []byte("x")).opt(optAbort, nil).Bytes(),
	} {
		f.Add(byte(0), s)
		f.Add(byte(1), s)
	}
	f.Fuzz(func(t *testing.T, mode byte, in []byte) {
		opts := Options{TLS: TLSOn, TLSCertDir: dir, Workers: 2, MaxInFlight: 4}
		if mode&1 != 0 {
			opts.TLS = TLSRequire
		}
		srv, err := New(opts, Export{Name: "d", Device: blockdevtest.NewMem(t, 1<<20, 512)},
			Export{Name: "vm", Device: blockdevtest.NewMem(t, 1<<20, 4096), Clients: []ClientAccess{{Subject: "writer"}}})
		require.NoError(t, err)
		sc := &streamConn{in: bytes.NewReader(in)}
		c := newConn(srv, sc)
		c.serve()
		require.NoError(t, srv.Close())
	})
}
