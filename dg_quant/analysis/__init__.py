"""Analysis of trained runs: result tables, flatness, loss surfaces, quantization noise, stability."""
