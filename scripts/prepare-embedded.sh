#!/usr/bin/env bash
# Build the embedded demo corpus (no download: docstrings, comments and help() topics of this Python's
# standard library, see preprocess/embedded/README.md) and binarise both variants:
#   word level (one paragraph per line, vocabulary capped at EMBEDDED_NWORDS, default 16000 with the
#   4 specials)  -> $DATA_DIR/embedded/word, $DATA_BIN/embedded-word
#   byte level (each UTF-8 byte one token, enwik8 format, end of paragraph -> </s>)
#                -> $DATA_DIR/embedded/byte, $DATA_BIN/embedded-byte
#
# Usage: scripts/prepare-embedded.sh
# Variables: EMBEDDED_NWORDS (16000), EMBEDDED_STDLIB (stdlib directory to read; default: $PYTHON's),
# EMBEDDED_MAX_DOCS (use only the first N documents; for tests), EMBEDDED_INCLUDE_TESTS=1 (also read the
# stdlib test suites where installed: bigger but not portable), and those of scripts/lib/prepare-common.sh.
# The same Python version always yields byte-identical text files.
set -euo pipefail
# shellcheck source=lib/prepare-common.sh
source "$(dirname "$0")/lib/prepare-common.sh"
pc_init embedded

NWORDS=${EMBEDDED_NWORDS:-16000}
TEXT=$DATA_DIR/embedded
DEST_WORD=$DATA_BIN/embedded-word
DEST_BYTE=$DATA_BIN/embedded-byte
TEXT_FILES=(manifest.json word/train.txt word/valid.txt word/test.txt byte/train.txt byte/valid.txt byte/test.txt)

pc_exit_if_done "$TEXT" "$DEST_WORD" "$DEST_BYTE" -- "${TEXT_FILES[@]}"

rebuilt=0
if pc_need "$TEXT" "${TEXT_FILES[@]}"; then
  pc_begin "$TEXT"
  args=(--outdir "$TEXT")
  [ -z "${EMBEDDED_STDLIB:-}" ] || args+=(--stdlib "$EMBEDDED_STDLIB")
  [ -z "${EMBEDDED_MAX_DOCS:-}" ] || args+=(--max-docs "$EMBEDDED_MAX_DOCS")
  [ "${EMBEDDED_INCLUDE_TESTS:-0}" != 1 ] || args+=(--include-tests)
  pc_log "building the corpus from the standard library of $PYTHON"
  pc_py preprocess.embedded.build "${args[@]}"
  pc_mark_complete "$TEXT" "embedded corpus: ${args[*]}"
  rebuilt=1
fi

# shellcheck disable=SC2046  # pc_bin_files prints plain file names
if [ "$rebuilt" = 1 ] || pc_need "$DEST_WORD" $(pc_bin_files); then
  pc_binarise embedded-word "$TEXT/word/train.txt" "$TEXT/word/valid.txt" "$TEXT/word/test.txt" "$DEST_WORD" \
    --nwordssrc "$NWORDS"
fi
# shellcheck disable=SC2046  # pc_bin_files prints plain file names
if [ "$rebuilt" = 1 ] || pc_need "$DEST_BYTE" $(pc_bin_files); then
  pc_binarise embedded-byte "$TEXT/byte/train.txt" "$TEXT/byte/valid.txt" "$TEXT/byte/test.txt" "$DEST_BYTE"
fi
pc_log "done: $DEST_WORD (word level, perplexity) and $DEST_BYTE (byte level, bits per byte)"
