package nbd

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Sentinel errors of the package, for errors.Is.
var (
	// ErrProtocol: the peer broke the protocol; the connection is closed.
	ErrProtocol = errors.New("nbd: protocol error")
	// ErrUnknownExport: the server has no export of the requested name.
	ErrUnknownExport = errors.New("nbd: unknown export")
	// ErrServerClosed: Serve was called on, or returned from, a server
	// that has been shut down.
	ErrServerClosed = errors.New("nbd: server closed")
	// ErrShutdown: the server answered ESHUTDOWN or ERR_SHUTDOWN.
	ErrShutdown = errors.New("nbd: server shutting down")
	// ErrTLSRequired: TLS is required for what the client asked
	// (NBD_REP_ERR_TLS_REQD), or a client on a TLS-only export did not
	// start TLS.
	ErrTLSRequired = errors.New("nbd: server requires TLS")
	// ErrBadURI: the URI is not an nbd://, nbd+unix://, nbds:// or
	// nbds+unix:// URI this package can use.
	ErrBadURI = errors.New("nbd: bad URI")
)

// Errno is an error value of the NBD protocol, as a server sends it in a
// reply. It matches blockdev's sentinels where one fits (EIO is
// blockdev.ErrIO, EPERM is blockdev.ErrReadOnly, ENOTSUP is
// blockdev.ErrNotSupported, ENOSPC is blockdev.ErrNoSpace and
// blockdev.ErrOutOfRange, the latter for a write past the end) and
// ErrShutdown for ESHUTDOWN.
type Errno uint32

// The error values the protocol defines.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

func (e Errno) Error() string {
	switch e {
	case EPERM:
		return "nbd: EPERM: operation not permitted"
	case EIO:
		return "nbd: EIO: input/output error"
	case ENOMEM:
		return "nbd: ENOMEM: cannot allocate memory"
	case EINVAL:
		return "nbd: EINVAL: invalid argument"
	case ENOSPC:
		return "nbd: ENOSPC: no space left on device"
	case EOVERFLOW:
		return "nbd: EOVERFLOW: value too large"
	case ENOTSUP:
		return "nbd: ENOTSUP: operation not supported"
	case ESHUTDOWN:
		return "nbd: ESHUTDOWN: server shutting down"
	}
	return fmt.Sprintf("nbd: error %d", uint32(e))
}

// Is maps protocol errors onto blockdev's sentinels.
func (e Errno) Is(target error) bool {
	switch target {
	case blockdev.ErrIO:
		return e == EIO
	case blockdev.ErrReadOnly:
		return e == EPERM
	case blockdev.ErrNotSupported:
		return e == ENOTSUP
	case blockdev.ErrOutOfRange, blockdev.ErrNoSpace:
		return e == ENOSPC
	case ErrShutdown:
		return e == ESHUTDOWN
	}
	return false
}

// errnoOf maps a device error to the NBD error value the server sends.
func errnoOf(err error) Errno {
	var errno syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.Is(err, blockdev.ErrNoSpace):
		return ENOSPC
	case errors.Is(err, blockdev.ErrReadOnly):
		return EPERM
	case errors.Is(err, blockdev.ErrMisaligned), errors.Is(err, blockdev.ErrOutOfRange):
		return EINVAL
	case errors.Is(err, blockdev.ErrClosed):
		return ESHUTDOWN
	case errors.As(err, &errno):
		switch errno {
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return EPERM
		case syscall.ENOMEM:
			return ENOMEM
		}
	}
	var remote Errno
	if errors.As(err, &remote) && remote != 0 {
		// A device that is itself an NBD client passes its server's
		// answer on.
		return remote
	}
	return EIO
}
