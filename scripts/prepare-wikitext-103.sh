#!/usr/bin/env bash
# Prepare WikiText-103 for fairseq (fairseq's examples/language_model/prepare-wikitext-103.sh, offline-capable):
# download (or take) wikitext-103-v1.zip, check it, extract wiki.{train,valid,test}.tokens unchanged and
# binarise them into ${DATA_BIN:-data-bin}/wikitext-103 with the dictionary built from train only.
#
# Usage: scripts/prepare-wikitext-103.sh [path/to/wikitext-103-v1.zip]   (or WIKITEXT103_ZIP=...)
#
# Convention: the given files used as is; fairseq appends </s> to every line (the paper's <eos>). Expected:
# train 1,801,350 lines / 103,227,021 tokens, valid 217,646, test 245,569 tokens; dictionary of 267,744
# entries (see preprocess/README.md).
#
# Checks: zip sha256 242ba0f2...539590 (WIKITEXT103_SHA256; Hugging Face dataset_infos, md5 9ddaacaf... in
# torchtext) and the sha256 of the extracted valid and test files (WIKITEXT103_VALID_SHA256,
# WIKITEXT103_TEST_SHA256; shared/data/README.md), so a re-zipped copy can be used with WIKITEXT103_SHA256=''.
# Other variables: WIKITEXT103_URL and those of scripts/lib/prepare-common.sh.
set -euo pipefail
# shellcheck source=lib/prepare-common.sh
source "$(dirname "$0")/lib/prepare-common.sh"
pc_init wikitext-103

URL=${WIKITEXT103_URL:-https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip}
EXPECTED_SHA256=${WIKITEXT103_SHA256-242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590}
VALID_SHA256=${WIKITEXT103_VALID_SHA256-9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b}
TEST_SHA256=${WIKITEXT103_TEST_SHA256-56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9}
TEXT=$DATA_DIR/wikitext-103
DEST=$DATA_BIN/wikitext-103
SPLIT_FILES=(wiki.train.tokens wiki.valid.tokens wiki.test.tokens)

pc_exit_if_done "$TEXT" "$DEST" -- "${SPLIT_FILES[@]}"

if pc_need "$TEXT" "${SPLIT_FILES[@]}"; then
  pc_begin "$TEXT"
  pc_fetch_archive WIKITEXT103_ZIP "${1:-${WIKITEXT103_ZIP:-}}" "$URL" "$TEXT/wikitext-103-v1.zip"
  pc_check_hash "$PC_ARCHIVE" sha256 "$EXPECTED_SHA256" "wikitext-103-v1.zip" WIKITEXT103_SHA256
  PC_CLEANUP="$TEXT/wiki.train.tokens $TEXT/wiki.valid.tokens $TEXT/wiki.test.tokens"
  pc_py preprocess.wikitext103.prepare --archive "$PC_ARCHIVE" --outdir "$TEXT" \
    || pc_reject "cannot extract the token files from $PC_ARCHIVE"
  pc_check_hash "$TEXT/wiki.valid.tokens" sha256 "$VALID_SHA256" "wiki.valid.tokens" WIKITEXT103_VALID_SHA256
  pc_check_hash "$TEXT/wiki.test.tokens" sha256 "$TEST_SHA256" "wiki.test.tokens" WIKITEXT103_TEST_SHA256
  pc_mark_complete "$TEXT" "wikitext-103 from $PC_ARCHIVE"
fi

pc_binarise wikitext-103 "$TEXT/wiki.train.tokens" "$TEXT/wiki.valid.tokens" "$TEXT/wiki.test.tokens" "$DEST"
pc_log "done: $DEST (counts in $DEST/preprocess.log; expected ones in preprocess/README.md)"
