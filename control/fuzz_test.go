package control

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzDecodeRequest: any line decodes to a valid request or a
// *RequestError, never a panic; a decoded request re-encodes to a line
// that decodes to the same request.
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		`{"op":"list"}`,
		`{"op":"stat","name":"vm1"}`,
		`{"op":"snapshot","name":"s","of":"origin"}`,
		`{"op":"clone","name":"c","from":"s"}`,
		`{"op":"delete","name":"c","wait":true}`,
		`{"op":"rename","name":"a","new_name":"b"}`,
		`{"op":"rollback","name":"origin","to":"s"}`,
		`{"op":"diff","from":"s1","to":"s2"}`,
		`{"op":"export-diff","from":"s1","to":"s2"}`,
		`{"op":"set-rate","rate":1048576}`,
		`{"op":"pause"}` + "\n",
		`{"op":"stat","name":"\u00e9\u0007"}`,
		`{"op":1}`,
		`{"op":"list"}{"op":"list"}`,
		`{"op":"list","rate":1e400}`,
		``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := DecodeRequest(line)
		if err != nil {
			var re *RequestError
			require.ErrorAs(t, err, &re)
			require.Equal(t, Request{}, r)
			return
		}
		require.NoError(t, r.Validate())
		b, err := json.Marshal(r)
		require.NoError(t, err)
		r2, err := DecodeRequest(b)
		require.NoError(t, err)
		require.Equal(t, r, r2)
	})
}

// FuzzDecodeResponse: any answer line decodes or is ErrBadAnswer.
func FuzzDecodeResponse(f *testing.F) {
	for _, s := range []string{
		`{"ok":true,"result":[{"id":1,"name":"origin"}]}`,
		`{"ok":false,"code":"not-found","error":"no such volume"}`,
		`{"ok":false}`,
		`{"ok":true,"result":`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := DecodeResponse(line)
		if err != nil {
			require.ErrorIs(t, err, ErrBadAnswer)
			return
		}
		require.True(t, r.OK || r.Error != "")
	})
}
