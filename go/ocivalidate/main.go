// Command ocivalidate validates OCI image documents against the OCI image
// spec's JSON schemas, with github.com/opencontainers/image-spec/schema
// (Debian: golang-github-opencontainers-image-spec-dev). lazypull's tests
// build it offline in GOPATH mode and check the manifests and configs that
// `lazypull push` and `lazypull convert` write.
//
// Usage:
//
//	ocivalidate manifest FILE [config FILE]...
//
// Each FILE is validated as the kind before it: `manifest` against
// ValidatorMediaTypeManifest, `config` against ValidatorMediaTypeImageConfig.
// It prints "ok KIND FILE" per valid document and exits 0 if all are valid;
// otherwise it prints each error and exits 1 (2 on a usage error). The
// schema package's warnings (such as layer media types it does not know)
// are printed but are not errors.
package main

import (
	"fmt"
	"os"

	"github.com/opencontainers/image-spec/schema"
)

func main() {
	args := os.Args[1:]
	if len(args) == 0 || len(args)%2 != 0 {
		fmt.Fprintln(os.Stderr, "usage: ocivalidate manifest FILE [config FILE]...")
		os.Exit(2)
	}
	failed := false
	for i := 0; i < len(args); i += 2 {
		kind, path := args[i], args[i+1]
		var v schema.Validator
		switch kind {
		case "manifest":
			v = schema.ValidatorMediaTypeManifest
		case "config":
			v = schema.ValidatorMediaTypeImageConfig
		default:
			fmt.Fprintf(os.Stderr, "unknown kind %q (manifest or config)\n", kind)
			os.Exit(2)
		}
		f, err := os.Open(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			failed = true
			continue
		}
		err = v.Validate(f)
		f.Close()
		if err != nil {
			fmt.Fprintf(os.Stderr, "invalid %s %s (%s): %v\n", kind, path, string(v), err)
			failed = true
			continue
		}
		fmt.Printf("ok %s %s\n", kind, path)
	}
	if failed {
		os.Exit(1)
	}
}
