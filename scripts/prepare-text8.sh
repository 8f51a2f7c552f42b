#!/usr/bin/env bash
# Prepare text8 for fairseq: download (or take) text8.zip, check it, split 90M/5M/5M characters, tokenise
# one token per character, binarise into ${DATA_BIN:-data-bin}/text8.
#
# Usage: scripts/prepare-text8.sh [path/to/text8.zip]          (or TEXT8_ZIP=path/to/text8.zip)
#
# Convention: kimiyoung/transformer-xl `prep_text8.py` (also used by facebookresearch/adaptive-span):
# train = first 90,000,000 characters, valid = next 5,000,000, test = last 5,000,000; each split is
# strip()-ped, spaces become `_`, characters are space-separated, and each split is ONE line, so fairseq adds
# exactly one </s> per split (vocabulary a-z + `_` = 27, + </s> = 28).
#
# Checks: text8.zip is 31,344,016 bytes (TEXT8_ZIP_SIZE; the size TensorFlow's word2vec tutorial checks);
# the unzipped text8 is 100,000,000 bytes (TEXT8_SIZE) with sha1 0dc3edebc970dcc96137e7deda4d9995af9d93de
# (TEXT8_SHA1; pinned by dmlc/gluon-nlp, a secondary source) and holds only a-z and space.
# Other variables: TEXT8_URL, TEXT8_HELDOUT (5000000) and those of scripts/lib/prepare-common.sh.
set -euo pipefail
# shellcheck source=lib/prepare-common.sh
source "$(dirname "$0")/lib/prepare-common.sh"
pc_init text8

URL=${TEXT8_URL:-http://mattmahoney.net/dc/text8.zip}
EXPECTED_ZIP_SIZE=${TEXT8_ZIP_SIZE-31344016}
EXPECTED_SIZE=${TEXT8_SIZE-100000000}
EXPECTED_SHA1=${TEXT8_SHA1-0dc3edebc970dcc96137e7deda4d9995af9d93de}
HELDOUT=${TEXT8_HELDOUT:-5000000}
TEXT=$DATA_DIR/text8
DEST=$DATA_BIN/text8
SPLIT_FILES=(train.txt valid.txt test.txt)

pc_exit_if_done "$TEXT" "$DEST" -- "${SPLIT_FILES[@]}"

if pc_need "$TEXT" "${SPLIT_FILES[@]}"; then
  pc_begin "$TEXT"
  pc_fetch_archive TEXT8_ZIP "${1:-${TEXT8_ZIP:-}}" "$URL" "$TEXT/text8.zip"
  pc_check_size "$PC_ARCHIVE" "$EXPECTED_ZIP_SIZE" "text8.zip" TEXT8_ZIP_SIZE
  PC_CLEANUP="$TEXT/text8"
  pc_py preprocess.unzip "$PC_ARCHIVE" text8 "$TEXT/text8" || pc_reject "cannot unpack $PC_ARCHIVE"
  pc_check_size "$TEXT/text8" "$EXPECTED_SIZE" "text8 (unzipped)" TEXT8_SIZE
  pc_check_hash "$TEXT/text8" sha1 "$EXPECTED_SHA1" "text8 (unzipped)" TEXT8_SHA1
  pc_py preprocess.text8.prepare --input "$TEXT/text8" --outdir "$TEXT" --heldout "$HELDOUT" \
    || pc_reject "$TEXT/text8 is not valid text8 (see the message above)"
  rm -f "$TEXT/text8"
  pc_mark_complete "$TEXT" "text8 split $HELDOUT held out, from $PC_ARCHIVE"
fi

pc_binarise text8 "$TEXT/train.txt" "$TEXT/valid.txt" "$TEXT/test.txt" "$DEST"
pc_log "done: $DEST (evaluate in bits per character)"
