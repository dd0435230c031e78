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

# require_files FILE...: one error line for the first that is missing.
require_files() {
    for f in "$@"; do
        [ -e "$f" ] || { echo "error: $f not found (official checkpoints go in ckpts/; see README: Sampling)" >&2; exit 2; }
    done
}
