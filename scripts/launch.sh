# Sourced by the launcher scripts: how many processes, and what starts them.
# NGPUS (processes) defaults to the visible GPUs, else 1. One process runs under plain python, so a bad input is
# one `error:` line instead of torchrun's report; more run under torchrun on this machine.
if [ -z "${NGPUS:-}" ]; then
    NGPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NGPUS:-0}" -ge 1 ] || NGPUS=1
fi
case "$NGPUS" in
    ''|*[!0-9]*|0) echo "error: NGPUS must be a positive number of processes, got '$NGPUS'" >&2; exit 2 ;;
esac
launch=(python)
[ "$NGPUS" -gt 1 ] && launch=(torchrun --standalone --nproc_per_node "$NGPUS")

# require_checkpoint FILE: one error line, saying where the official weights are, unless the checkpoint exists.
require_checkpoint() {
    [ -e "$1" ] || { echo "error: $1 not found (the official checkpoints are at huggingface.co/apple/starflow:" \
        "download them into ckpts/)" >&2; exit 2; }
}

# require_config FILE: one error line unless the config YAML exists.
require_config() {
    [ -f "$1" ] || { echo "error: config $1 not found (the configs are in configs/)" >&2; exit 2; }
}

# require_count WHAT VALUE: one error line (exit 2) unless VALUE is a whole number >= 1.
require_count() {
    case "$2" in
        ''|*[!0-9]*|0) echo "error: $1 must be a whole number >= 1, got '$2' (usage: top of $0)" >&2; exit 2 ;;
    esac
}

# require_image VALUE: 'none' or an existing file.
require_image() {
    [ "$1" = none ] || [ -f "$1" ] || { echo "error: input image '$1' not found (pass a file, or none)" >&2; exit 2; }
}
