"""Extract one member of a zip archive to a file (streamed; no ``unzip`` binary needed).

CLI: ``python -m preprocess.unzip ARCHIVE MEMBER DEST``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import zipfile
from typing import List, Optional


class MemberMissing(Exception):
    """The archive does not contain the requested member."""


def extract_member(archive: str, member: str, dest: str) -> int:
    """Copy ``member`` of zip ``archive`` to ``dest`` (written via a temporary file, then renamed).

    Returns the number of bytes written. Raises ``MemberMissing`` (naming the members present) when the
    archive lacks ``member`` and ``zipfile.BadZipFile`` when ``archive`` is not a zip file.
    """
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        if member not in names:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            raise MemberMissing(f"{archive} has no member {member!r} (members: {shown or 'none'})")
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        tmp = dest + ".part"
        with zf.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dest)
        return os.path.getsize(dest)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive")
    parser.add_argument("member", help="path inside the archive, e.g. wikitext-103/wiki.train.tokens")
    parser.add_argument("dest")
    args = parser.parse_args(argv)
    try:
        size = extract_member(args.archive, args.member, args.dest)
    except MemberMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except zipfile.BadZipFile as e:
        print(f"error: {args.archive}: {e}", file=sys.stderr)
        return 1
    print(f"extracted {args.member} -> {args.dest} ({size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
