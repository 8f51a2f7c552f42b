#!/usr/bin/env bash
# Prepare enwik8 for fairseq: download (or take) enwik8.zip, check it, split 90M/5M/5M bytes, tokenise one
# token per byte, binarise into ${DATA_BIN:-data-bin}/enwik8.
#
# Usage: scripts/prepare-enwik8.sh [path/to/enwik8.zip]        (or ENWIK8_ZIP=path/to/enwik8.zip)
#
# Convention (ENWIK8_NEWLINE, default eos): the split and the tokenised format are those of
# Smerity/sha-rnn and salesforce/awd-lstm-lm `prep_enwik8.py`: train = first 90,000,000 bytes, valid = next
# 5,000,000, test = last 5,000,000; each byte written as its decimal value, newline bytes as real line
# breaks, so fairseq turns every newline into </s> (<eos>) and adds one </s> at the end of a split that does
# not end with a newline (vocabulary 204 bytes + </s> = 205; SHA-RNN and adaptive-span numbers).
# ENWIK8_NEWLINE=drop gives Transformer-XL's convention instead (newlines removed, vocabulary 204 + the
# one final </s>) in $DATA_DIR/enwik8-nonl and $DATA_BIN/enwik8-nonl. State which one a result used.
#
# Checks: the unzipped file is 100,000,000 bytes (ENWIK8_SIZE) with md5 a1fa5ffddb56f4953e226637dabbb36a
# (ENWIK8_MD5; published on mattmahoney.net/dc/textdata.html). Other variables: ENWIK8_URL,
# ENWIK8_HELDOUT (5000000) and those of scripts/lib/prepare-common.sh (DATA_DIR, DATA_BIN, WORKERS, FORCE).
set -euo pipefail
# shellcheck source=lib/prepare-common.sh
source "$(dirname "$0")/lib/prepare-common.sh"
pc_init enwik8

URL=${ENWIK8_URL:-http://mattmahoney.net/dc/enwik8.zip}
EXPECTED_MD5=${ENWIK8_MD5-a1fa5ffddb56f4953e226637dabbb36a}
EXPECTED_SIZE=${ENWIK8_SIZE-100000000}
HELDOUT=${ENWIK8_HELDOUT:-5000000}
NEWLINE=${ENWIK8_NEWLINE:-eos}
case "$NEWLINE" in
  eos) CORPUS=enwik8 ;;
  drop) CORPUS=enwik8-nonl ;;
  *) pc_die "ENWIK8_NEWLINE must be 'eos' or 'drop', got '$NEWLINE'" ;;
esac
TEXT=$DATA_DIR/$CORPUS
DEST=$DATA_BIN/$CORPUS
SPLIT_FILES=(train.txt valid.txt test.txt)

pc_exit_if_done "$TEXT" "$DEST" -- "${SPLIT_FILES[@]}"

if pc_need "$TEXT" "${SPLIT_FILES[@]}"; then
  pc_begin "$TEXT"
  pc_fetch_archive ENWIK8_ZIP "${1:-${ENWIK8_ZIP:-}}" "$URL" "$DATA_DIR/enwik8/enwik8.zip"
  PC_CLEANUP="$TEXT/enwik8"
  pc_py preprocess.unzip "$PC_ARCHIVE" enwik8 "$TEXT/enwik8" || pc_reject "cannot unpack $PC_ARCHIVE"
  pc_check_size "$TEXT/enwik8" "$EXPECTED_SIZE" "enwik8 (unzipped)" ENWIK8_SIZE
  pc_check_hash "$TEXT/enwik8" md5 "$EXPECTED_MD5" "enwik8 (unzipped)" ENWIK8_MD5
  pc_py preprocess.enwik8.prepare --input "$TEXT/enwik8" --outdir "$TEXT" --heldout "$HELDOUT" --newline "$NEWLINE"
  rm -f "$TEXT/enwik8"
  pc_mark_complete "$TEXT" "enwik8 split $HELDOUT held out, newline=$NEWLINE, from $PC_ARCHIVE"
fi

pc_binarise "$CORPUS" "$TEXT/train.txt" "$TEXT/valid.txt" "$TEXT/test.txt" "$DEST"
pc_log "done: $DEST (evaluate in bits per byte; newline convention: $NEWLINE)"
