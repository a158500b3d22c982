package nbd

import (
	"fmt"
	"net"
	"net/url"
	"strings"
)

// DefaultPort is the IANA port of NBD.
const DefaultPort = "10809"

// target is a parsed NBD URI.
type target struct {
	network string // "tcp" or "unix"
	addr    string
	export  string
	tls     bool   // nbds: upgrade with NBD_OPT_STARTTLS
	tlsDir  string // tls-certificates: the certificate directory
	tlsHost string // the name the server's certificate must carry
}

// parseURI accepts nbd://host[:port][/export] and
// nbd+unix:///[export]?socket=PATH, and their TLS forms nbds:// and
// nbds+unix:// with the optional query parameters tls-certificates=DIR
// and tls-hostname=NAME (the NBD URI specification's forms and libnbd's
// parameter names).
func parseURI(s string) (target, error) {
	u, err := url.Parse(s)
	if err != nil {
		return target{}, fmt.Errorf("%w: %v", ErrBadURI, err)
	}
	t, err := parsePlainURI(s, u)
	if err != nil {
		return target{}, err
	}
	if t.tls {
		q := u.Query()
		t.tlsDir = q.Get("tls-certificates")
		t.tlsHost = q.Get("tls-hostname")
		if t.tlsHost == "" {
			t.tlsHost = u.Hostname()
		}
		if t.tlsHost == "" {
			t.tlsHost = "localhost"
		}
	}
	return t, nil
}

func parsePlainURI(s string, u *url.URL) (target, error) {
	export := strings.TrimPrefix(u.Path, "/")
	secure := strings.HasPrefix(u.Scheme, "nbds")
	switch strings.Replace(u.Scheme, "nbds", "nbd", 1) {
	case "nbd", "nbd+tcp":
		if u.Host == "" {
			return target{}, fmt.Errorf("%w: %q has no host", ErrBadURI, s)
		}
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = DefaultPort
		}
		return target{network: "tcp", addr: net.JoinHostPort(host, port), export: export, tls: secure}, nil
	case "nbd+unix":
		sock := u.Query().Get("socket")
		if sock == "" || u.Host != "" {
			return target{}, fmt.Errorf("%w: %q: nbd+unix needs ?socket=PATH and no host", ErrBadURI, s)
		}
		return target{network: "unix", addr: sock, export: export, tls: secure}, nil
	}
	return target{}, fmt.Errorf("%w: %q: scheme must be nbd, nbd+unix, nbds or nbds+unix", ErrBadURI, s)
}

// URI returns the URI under which a client reaches export on a server
// listening at addr (a *net.TCPAddr or a *net.UnixAddr, as
// net.Listener.Addr returns them).
func URI(addr net.Addr, export string) string {
	path := "/" + url.PathEscape(export)
	if export == "" {
		path = ""
	}
	if addr.Network() == "unix" {
		if path == "" {
			path = "/"
		}
		return "nbd+unix://" + path + "?socket=" + strings.ReplaceAll(url.QueryEscape(addr.String()), "%2F", "/")
	}
	return "nbd://" + addr.String() + path
}
