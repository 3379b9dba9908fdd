# Sourced by the scripts: one build directory outside the clone, so reruns are incremental.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/holdfast/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# Tools installed with `cargo install` (s3s-fs, cargo-fuzz).
case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac
