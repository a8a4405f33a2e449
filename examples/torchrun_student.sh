#!/usr/bin/env bash
# Stage 2 with DDP under torchrun: one process per GPU; the stored shards are split by rank.
#
#   RUN_DIR=runs/r1 OUT=out/lam1 bash examples/torchrun_student.sh            # one node, 8 GPUs
#   NODE_RANK=0 HEAD=10.0.0.1 bash examples/torchrun_student.sh two-nodes    # on the first node
#   NODE_RANK=1 HEAD=10.0.0.1 bash examples/torchrun_student.sh two-nodes    # on the second node
#
# torchrun runs `pipeline` (the console script, a Python file) in every process. The student's run
# directory option is spelled --run-dir, not --run: torchrun's own parser swallows any option that
# abbreviates its --run-path. --batch-size is per process: the global batch is
# batch-size x grad-accum x processes, and the loss is normalised by the global count of trained
# tokens, so changing the process count at a fixed global batch gives the same gradients.
set -euo pipefail

MODE=${1:-one-node}
RUN_DIR=${RUN_DIR:-runs/r1}
OUT=${OUT:-out/lam1}
NPROC=${NPROC:-8}                    # processes (GPUs) per node
PORT=${PORT:-29500}
PIPELINE=$(command -v pipeline) || { echo "pipeline not on PATH: activate the label-anneal venv" >&2; exit 1; }
STUDENT_ARGS=(student --run-dir "${RUN_DIR}" --out "${OUT}" --kl-weight "${KL_WEIGHT:-1}"
              --batch-size "${BATCH_SIZE:-4}" --grad-accum "${GRAD_ACCUM:-4}" --save-every "${SAVE_EVERY:-500}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false

case "${MODE}" in
one-node)
    exec torchrun --standalone --nproc-per-node "${NPROC}" "${PIPELINE}" "${STUDENT_ARGS[@]}" "${@:2}"
    ;;
two-nodes)
    # Static rendezvous: node 0 (HEAD) hosts the store; start the same command on both nodes.
    # RUN_DIR must be readable and OUT writable from both nodes (a shared filesystem).
    : "${NODE_RANK:?set NODE_RANK=0 on the head node and 1 on the other}" "${HEAD:?set HEAD to the address of node 0}"
    exec torchrun --nnodes 2 --node-rank "${NODE_RANK}" --nproc-per-node "${NPROC}" \
        --rdzv-endpoint "${HEAD}:${PORT}" "${PIPELINE}" "${STUDENT_ARGS[@]}" "${@:2}"
    ;;
*)
    echo "usage: $0 [one-node|two-nodes] [extra student options...]" >&2
    exit 2
    ;;
esac
