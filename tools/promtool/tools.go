//go:build tools

// Pins promtool's module for build.sh. Not part of the shipped product.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
