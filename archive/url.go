package archive

import (
	"context"
	"fmt"
	"strings"
)

// NewBackend opens the backend a location names: "s3://BUCKET[/PREFIX]"
// (with o for the endpoint, region and credentials; o.Bucket and o.Prefix
// are taken from the URL), "file:///DIR" or a plain directory path.
func NewBackend(ctx context.Context, location string, o S3Options) (Backend, error) {
	switch {
	case strings.HasPrefix(location, "s3://"):
		bucket, prefix, err := ParseS3URL(location)
		if err != nil {
			return nil, err
		}
		o.Bucket, o.Prefix = bucket, prefix
		return NewS3(ctx, o)
	case strings.HasPrefix(location, "file://"):
		return NewDir(strings.TrimPrefix(location, "file://"))
	case strings.Contains(location, "://") || location == "":
		return nil, fmt.Errorf("archive: location %q: want s3://BUCKET/PREFIX or a directory: %w", location, ErrOptions)
	}
	return NewDir(location)
}

// SplitBackup splits "LOCATION/BACKUP" (such as s3://bucket/prefix/ID) into
// the repository's location and the backup ID.
func SplitBackup(s string) (location, id string, err error) {
	i := strings.LastIndexByte(strings.TrimSuffix(s, "/"), '/')
	if i < 0 {
		return "", "", fmt.Errorf("archive: %q is not LOCATION/BACKUP: %w", s, ErrOptions)
	}
	location, id = s[:i], strings.TrimSuffix(s[i+1:], "/")
	if !validID(id) || location == "" || strings.HasSuffix(location, ":/") {
		return "", "", fmt.Errorf("archive: %q is not LOCATION/BACKUP: %w", s, ErrOptions)
	}
	return location, id, nil
}
