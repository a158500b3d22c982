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
}

// parseURI accepts nbd://host[:port][/export] and
// nbd+unix:///[export]?socket=PATH (the NBD URI specification's forms
// without TLS).
func parseURI(s string) (target, error) {
	u, err := url.Parse(s)
	if err != nil {
		return target{}, fmt.Errorf("%w: %v", ErrBadURI, err)
	}
	export := strings.TrimPrefix(u.Path, "/")
	switch u.Scheme {
	case "nbd", "nbd+tcp":
		if u.Host == "" {
			return target{}, fmt.Errorf("%w: %q has no host", ErrBadURI, s)
		}
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = DefaultPort
		}
		return target{network: "tcp", addr: net.JoinHostPort(host, port), export: export}, nil
	case "nbd+unix":
		sock := u.Query().Get("socket")
		if sock == "" || u.Host != "" {
			return target{}, fmt.Errorf("%w: %q: nbd+unix needs ?socket=PATH and no host", ErrBadURI, s)
		}
		return target{network: "unix", addr: sock, export: export}, nil
	case "nbds", "nbds+unix", "nbds+tcp":
		return target{}, fmt.Errorf("%w: %q: TLS is not supported", ErrBadURI, s)
	}
	return target{}, fmt.Errorf("%w: %q: scheme must be nbd or nbd+unix", ErrBadURI, s)
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
