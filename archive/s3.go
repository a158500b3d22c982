package archive

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"iter"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Options configures an S3 backend. The zero value (plus Bucket) talks to
// AWS S3 with credentials from the environment.
type S3Options struct {
	// Endpoint is host[:port]; empty means $AWS_ENDPOINT_URL, else
	// s3.amazonaws.com. A URL ("http://host:port") also sets Insecure from
	// its scheme.
	Endpoint string
	// Bucket must exist (ErrNoBucket otherwise); Prefix is prepended to
	// every key ("backups/vm1" and "backups/vm1/" are the same).
	Bucket, Prefix string
	// Region: empty means $AWS_REGION, $AWS_DEFAULT_REGION, or whatever the
	// server says.
	Region string
	// PathStyle addresses buckets as endpoint/bucket rather than
	// bucket.endpoint (MinIO, versitygw, Ceph and most on-premises stores
	// want it).
	PathStyle bool
	// Insecure speaks plain HTTP instead of TLS. InsecureSkipVerify keeps
	// TLS but accepts any certificate. CAFile is a PEM file of the
	// certificates to trust instead of the system's (a private CA).
	Insecure, InsecureSkipVerify bool
	CAFile                       string
	// AccessKey and SecretKey, when set, are used as given. Otherwise the
	// standard AWS environment variables (AWS_ACCESS_KEY_ID,
	// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) are tried, then the profile
	// file (ProfileFile, default ~/.aws/credentials; Profile, default
	// $AWS_PROFILE or "default").
	AccessKey, SecretKey, SessionToken string
	ProfileFile, Profile               string
	// MaxRetries bounds the client's retries of one request; 0 means 3.
	MaxRetries int
	// Transport, if set, replaces the HTTP transport (tests).
	Transport http.RoundTripper
}

// S3 is a Backend over an S3-compatible bucket, spoken through minio-go.
type S3 struct {
	client *minio.Client
	bucket string
	prefix string
}

// ParseS3URL splits "s3://bucket/prefix" into bucket and prefix.
func ParseS3URL(s string) (bucket, prefix string, err error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "s3" || u.Host == "" {
		return "", "", fmt.Errorf("archive: %q is not s3://BUCKET[/PREFIX]: %w", s, ErrBadKey)
	}
	return u.Host, strings.Trim(u.Path, "/"), nil
}

// NewS3 connects to the bucket and checks that it exists.
func NewS3(ctx context.Context, o S3Options) (*S3, error) {
	endpoint := o.Endpoint
	if endpoint == "" {
		endpoint = os.Getenv("AWS_ENDPOINT_URL")
	}
	secure := !o.Insecure
	if strings.Contains(endpoint, "://") {
		u, err := url.Parse(endpoint)
		if err != nil {
			return nil, fmt.Errorf("archive: endpoint %q: %w", endpoint, err)
		}
		secure = u.Scheme == "https"
		endpoint = u.Host
	}
	if endpoint == "" {
		endpoint = "s3.amazonaws.com"
	}
	region := o.Region
	if region == "" {
		region = os.Getenv("AWS_REGION")
	}
	if region == "" {
		region = os.Getenv("AWS_DEFAULT_REGION")
	}
	var creds *credentials.Credentials
	if o.AccessKey != "" {
		creds = credentials.NewStaticV4(o.AccessKey, o.SecretKey, o.SessionToken)
	} else {
		creds = credentials.NewChainCredentials([]credentials.Provider{
			&credentials.EnvAWS{},
			&credentials.FileAWSCredentials{Filename: o.ProfileFile, Profile: o.Profile},
		})
	}
	transport := o.Transport
	if transport == nil && (o.InsecureSkipVerify || o.CAFile != "") {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.TLSClientConfig = &tls.Config{InsecureSkipVerify: o.InsecureSkipVerify}
		if o.CAFile != "" {
			pem, err := os.ReadFile(o.CAFile)
			if err != nil {
				return nil, fmt.Errorf("archive: CA file: %w", err)
			}
			t.TLSClientConfig.RootCAs = x509.NewCertPool()
			if !t.TLSClientConfig.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("archive: CA file %s holds no PEM certificate: %w", o.CAFile, ErrOptions)
			}
		}
		transport = t
	}
	retries := o.MaxRetries
	if retries <= 0 {
		retries = 3
	}
	lookup := minio.BucketLookupAuto
	if o.PathStyle {
		lookup = minio.BucketLookupPath
	}
	c, err := minio.New(endpoint, &minio.Options{
		Creds: creds, Secure: secure, Region: region, BucketLookup: lookup,
		Transport: transport, MaxRetries: retries,
	})
	if err != nil {
		return nil, fmt.Errorf("archive: s3 %s: %w", endpoint, err)
	}
	ok, err := c.BucketExists(ctx, o.Bucket)
	if err != nil {
		return nil, fmt.Errorf("archive: s3 bucket %q: %w", o.Bucket, s3err(err))
	}
	if !ok {
		return nil, fmt.Errorf("archive: s3 bucket %q at %s: %w", o.Bucket, endpoint, ErrNoBucket)
	}
	prefix := strings.Trim(o.Prefix, "/")
	if prefix != "" {
		prefix += "/"
	}
	return &S3{client: c, bucket: o.Bucket, prefix: prefix}, nil
}

// Client returns the underlying minio client (to create buckets, say).
func (s *S3) Client() *minio.Client { return s.client }

func s3err(err error) error {
	switch minio.ToErrorResponse(err).Code {
	case minio.NoSuchKey:
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	case minio.NoSuchBucket:
		return fmt.Errorf("%w: %w", ErrNoBucket, err)
	}
	return err
}

// Put implements Backend.
func (s *S3) Put(ctx context.Context, key string, data []byte) error {
	_, err := s.client.PutObject(ctx, s.bucket, s.prefix+key, bytes.NewReader(data), int64(len(data)),
		minio.PutObjectOptions{ContentType: "application/octet-stream", DisableMultipart: true})
	if err != nil {
		return fmt.Errorf("archive: put %s: %w", key, s3err(err))
	}
	return nil
}

// Get implements Backend.
func (s *S3) Get(ctx context.Context, key string) ([]byte, error) {
	return s.get(ctx, key, minio.GetObjectOptions{})
}

// GetRange implements Backend with a ranged GET.
func (s *S3) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	if off < 0 || n <= 0 {
		return nil, fmt.Errorf("archive: get %s range %d+%d: %w", key, off, n, ErrBadKey)
	}
	var o minio.GetObjectOptions
	if err := o.SetRange(off, off+n-1); err != nil {
		return nil, fmt.Errorf("archive: get %s: %w", key, err)
	}
	return s.get(ctx, key, o)
}

func (s *S3) get(ctx context.Context, key string, o minio.GetObjectOptions) ([]byte, error) {
	obj, err := s.client.GetObject(ctx, s.bucket, s.prefix+key, o)
	if err != nil {
		return nil, fmt.Errorf("archive: get %s: %w", key, s3err(err))
	}
	defer obj.Close()
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, obj); err != nil {
		return nil, fmt.Errorf("archive: get %s: %w", key, s3err(err))
	}
	return buf.Bytes(), nil
}

// List implements Backend.
func (s *S3) List(ctx context.Context, prefix string) iter.Seq2[ObjectInfo, error] {
	return func(yield func(ObjectInfo, error) bool) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel() // stops minio's listing goroutine if the caller breaks out
		for o := range s.client.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: s.prefix + prefix, Recursive: true}) {
			if o.Err != nil {
				yield(ObjectInfo{}, fmt.Errorf("archive: list %s: %w", prefix, s3err(o.Err)))
				return
			}
			if !yield(ObjectInfo{Key: strings.TrimPrefix(o.Key, s.prefix), Size: o.Size, ModTime: o.LastModified}, nil) {
				return
			}
		}
	}
}

// Delete implements Backend.
func (s *S3) Delete(ctx context.Context, key string) error {
	err := s.client.RemoveObject(ctx, s.bucket, s.prefix+key, minio.RemoveObjectOptions{})
	if err != nil && !errors.Is(s3err(err), ErrNotFound) {
		return fmt.Errorf("archive: delete %s: %w", key, s3err(err))
	}
	return nil
}
