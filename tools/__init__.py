"""Developer tools beside the package: the GPU check, the MLflow UI screenshots, the harness-overhead
benchmark and the builders of the embedded tiny models. A user's run never imports them."""
