package control

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

// A forced delete decodes; a busy answer matches ErrBusy and nothing else.
func TestDeleteForceAndBusy(t *testing.T) {
	r, err := DecodeRequest([]byte(`{"op":"delete","name":"vm1","force":true,"wait":true}`))
	require.NoError(t, err)
	require.Equal(t, Request{Op: OpDelete, Name: "vm1", Force: true, Wait: true}, r)
	var busy error = &Error{Op: OpDelete, Code: CodeBusy, Message: "volume is in use"}
	require.ErrorIs(t, busy, ErrBusy)
	for _, other := range []error{ErrNotFound, ErrExists, ErrNoSpace} {
		require.False(t, errors.Is(busy, other))
	}
	require.False(t, errors.Is(&Error{Code: CodeFailed, Message: "x"}, ErrBusy))
}
