// kstatus prints what sigs.k8s.io/cli-utils' kstatus (the library behind Flux's and Argo CD's
// health of custom resources, and `kpt live status`) computes for one object: it reads the
// object as JSON on stdin and prints its status (Current, InProgress, Failed, ...), a tab and
// its message. For tests/controller.rs. Not part of the shipped product.
package main

import (
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: reading stdin:", err)
		os.Exit(2)
	}
	// Unstructured's own decoding: integers stay int64, as kstatus reads them.
	object := &unstructured.Unstructured{}
	if err := object.UnmarshalJSON(data); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus: the input is not a Kubernetes object in JSON:", err)
		os.Exit(2)
	}
	result, err := status.Compute(object)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
	fmt.Printf("%s\t%s\n", result.Status, result.Message)
}
