// Package control is the control protocol of a running blocksnap process
// (`blocksnap serve` over a snapshot store, `blocksnap hydrate` over a
// clone): a Unix stream socket carrying one JSON object per line. A VM
// manager or any other program drives a running server through Client
// without shelling out to the blocksnap command; the command itself uses
// the same Client.
//
// The schema (every operation, its fields and its result) is documented in
// docs/control.md in the repository; the types here are that schema in Go.
// Requests are decoded by DecodeRequest, which validates them fully (known
// operation, field sizes, the fields each operation needs) and returns a
// *RequestError for anything else, so a server never acts on a malformed
// request. Results are plain JSON objects; an unknown field in one is
// ignored, so servers may add fields without breaking older clients.
package control
