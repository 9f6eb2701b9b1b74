#!/usr/bin/env python3
"""Deterministic content generator for tools/bench.

Subcommands (all output is a pure function of the arguments, except `bins`,
which copies host files and therefore depends on what the host has installed):

  text   DEST --bytes N --seed S    seeded pseudo-text: prose, logs, CSV, JSON, code
  bins   DEST --bytes N SRC...      regular files from SRC dirs, sorted walk, up to N bytes
  random DEST --bytes N --seed S    pseudo-random bytes (fallback when openssl is missing)

Each subcommand prints a one-line summary ("files=... bytes=...") on stdout;
`bins` also writes a manifest (size and source path per file) with --manifest.
"""

import argparse
import os
import random
import shutil
import stat
import sys

CHUNK = 1 << 20


# --------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------

CONSONANTS = "b c d f g h j k l m n p r s t v w z br ch cl dr fl gr pl sh st th tr".split()
VOWELS = "a e i o u ai ea ee io ou y".split()


def make_vocab(rng, n):
    words = []
    seen = set()
    while len(words) < n:
        w = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4))))
        if rng.random() < 0.3:
            w += rng.choice("nrstlmdk")
        if w not in seen:
            seen.add(w)
            words.append(w)
    # Zipf-like frequencies: a few very common words, a long tail.
    cum = []
    total = 0.0
    for rank in range(1, n + 1):
        total += 1.0 / rank ** 1.05
        cum.append(total)
    return words, cum


class TextGen:
    def __init__(self, seed):
        rng = random.Random(seed)
        self.words, self.cum = make_vocab(rng, 30000)
        # A pool of sentences (~16 MB) so that generating bulk prose is fast;
        # it is far larger than zstd -1's window, so compression stays word-level.
        n_sent = 200000
        lengths = [rng.randint(4, 24) for _ in range(n_sent)]
        flat = rng.choices(self.words, cum_weights=self.cum, k=sum(lengths))
        punct = rng.choices([". ", ". ", ". ", "? ", "! ", "; ", ", and "], k=n_sent)
        pool = []
        i = 0
        for ln, p in zip(lengths, punct):
            ws = flat[i:i + ln]
            i += ln
            s = " ".join(ws)
            pool.append(s[0].upper() + s[1:] + p)
        self.pool = pool
        self.hosts = ["node-%02d" % i for i in range(40)]
        self.services = self.words[200:260]
        self.levels = ["INFO"] * 12 + ["DEBUG"] * 6 + ["WARN"] * 2 + ["ERROR"]

    def prose(self, rng, size):
        out, n = [], 0
        while n < size:
            k = rng.randint(3, 9)
            para = "".join(rng.choices(self.pool, k=k)).rstrip() + "\n\n"
            if rng.random() < 0.08:
                para = "## " + " ".join(rng.choices(self.words[:3000], k=rng.randint(2, 6))).title() + "\n\n" + para
            out.append(para)
            n += len(para)
        return "".join(out)

    def log(self, rng, size):
        out, n = [], 0
        t = 1700000000.0 + rng.random() * 1e7
        pid = rng.randint(100, 60000)
        while n < size:
            lines = []
            for _ in range(256):
                t += rng.expovariate(20.0)
                sec = int(t)
                ms = int((t - sec) * 1000)
                host = rng.choice(self.hosts)
                svc = rng.choice(self.services)
                lvl = rng.choice(self.levels)
                msg = rng.choice(self.pool).rstrip(" ,;")
                lines.append("%d.%03d %s %s[%d]: %s %s req=%08x dur=%dms\n" % (
                    sec, ms, host, svc, pid + (sec % 7), lvl, msg,
                    rng.getrandbits(32), int(rng.expovariate(0.02))))
            chunk = "".join(lines)
            out.append(chunk)
            n += len(chunk)
        return "".join(out)

    def csv(self, rng, size):
        cols = rng.randint(4, 9)
        names = rng.sample(self.words[:2000], cols)
        out = [",".join(["id"] + names) + "\n"]
        n = len(out[0])
        row = 0
        while n < size:
            rows = []
            for _ in range(256):
                row += 1
                vals = [str(row)]
                for c in range(cols):
                    kind = c % 4
                    if kind == 0:
                        vals.append("%.4f" % rng.gauss(100.0, 35.0))
                    elif kind == 1:
                        vals.append(str(rng.randint(0, 1 << 20)))
                    elif kind == 2:
                        vals.append(rng.choice(self.words[:500]))
                    else:
                        vals.append("%.2f" % (rng.random() * 1000))
                rows.append(",".join(vals) + "\n")
            chunk = "".join(rows)
            out.append(chunk)
            n += len(chunk)
        return "".join(out)

    def json(self, rng, size):
        out = ["[\n"]
        n = 2
        first = True
        while n < size:
            recs = []
            for _ in range(64):
                w = rng.choices(self.words, cum_weights=self.cum, k=3)
                rec = ('%s  {"id": %d, "name": "%s", "kind": "%s", "score": %.3f, '
                       '"tags": ["%s", "%s"], "active": %s, "note": "%s"}' % (
                           "" if first else ",\n", rng.getrandbits(40), w[0], w[1],
                           rng.random() * 100, w[2], rng.choice(self.words[:300]),
                           "true" if rng.random() < 0.7 else "false",
                           rng.choice(self.pool).strip().replace('"', "'")))
                first = False
                recs.append(rec)
            chunk = "".join(recs)
            out.append(chunk)
            n += len(chunk)
        out.append("\n]\n")
        return "".join(out)

    def code(self, rng, size):
        out, n = [], 0
        idents = self.words[:4000]
        types = ["u8", "u16", "u32", "u64", "usize", "i64", "bool", "&str", "Vec<u8>", "Option<u64>"]
        while n < size:
            name = "_".join(rng.sample(idents, 2))
            args = ", ".join("%s: %s" % (rng.choice(idents), rng.choice(types))
                             for _ in range(rng.randint(0, 4)))
            body = []
            for _ in range(rng.randint(2, 14)):
                r = rng.random()
                a, b, c = rng.sample(idents, 3)
                if r < 0.35:
                    body.append("    let %s = %s(%s, %d);\n" % (a, b, c, rng.randint(0, 4096)))
                elif r < 0.55:
                    body.append("    if %s > %s {\n        return Err(Error::%s);\n    }\n" % (a, b, c.title()))
                elif r < 0.75:
                    body.append("    // %s\n" % rng.choice(self.pool).strip())
                else:
                    body.append("    for %s in %s.iter() {\n        %s.push(*%s);\n    }\n" % (a, b, c, a))
            fn = "/// %s\npub fn %s(%s) -> Result<%s> {\n%s    Ok(Default::default())\n}\n\n" % (
                rng.choice(self.pool).strip(), name, args, rng.choice(types), "".join(body))
            out.append(fn)
            n += len(fn)
        return "".join(out)


TEXT_KINDS = [
    # kind, extension, weight (share of files)
    ("prose", "txt", 30),
    ("prose", "md", 10),
    ("log", "log", 25),
    ("csv", "csv", 15),
    ("json", "json", 10),
    ("code", "rs", 10),
]


def cmd_text(args):
    rng = random.Random(args.seed)
    gen = TextGen(args.seed + 1)
    weights = [w for _, _, w in TEXT_KINDS]
    total = 0
    nfiles = 0
    while total < args.bytes:
        kind, ext, _ = rng.choices(TEXT_KINDS, weights=weights)[0]
        # log-normal sizes: median ~16 KiB, a long tail up to 16 MiB
        size = int(min(max(rng.lognormvariate(9.7, 2.0), 200), 16 << 20))
        size = min(size, args.bytes - total)
        frng = random.Random(rng.getrandbits(64))
        data = getattr(gen, kind)(frng, size).encode("ascii")[:size]
        d = os.path.join(args.dest, kind, "d%03d" % (nfiles // 2500), "d%02d" % ((nfiles // 50) % 50))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%06d.%s" % (nfiles, ext)), "wb") as f:
            f.write(data)
        total += len(data)
        nfiles += 1
    print("files=%d bytes=%d" % (nfiles, total))


# --------------------------------------------------------------------------
# bins
# --------------------------------------------------------------------------

def walk_sorted(root, skip_dirs):
    """Yield regular-file paths under root in byte-sorted order, not following symlinks."""
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return
    for name in entries:
        p = os.path.join(root, name)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if os.path.realpath(p) in skip_dirs:
                continue
            yield from walk_sorted(p, skip_dirs)
        elif stat.S_ISREG(st.st_mode):
            yield p, st


def cmd_bins(args):
    budget = args.bytes
    total = 0
    nfiles = 0
    seen = set()
    manifest = []
    sources = [os.path.realpath(s) for s in args.sources]
    for i, src in enumerate(sources):
        if budget - total < 65536:
            break
        if not os.path.isdir(src):
            continue
        # don't descend from a later source into an earlier one (e.g. /usr/lib -> x86_64-linux-gnu)
        skip = set(sources[:i])
        for path, st in walk_sorted(src, skip):
            if budget - total < 65536:
                break
            key = (st.st_dev, st.st_ino)
            if key in seen or st.st_size == 0 or st.st_size > budget - total:
                continue
            seen.add(key)
            rel = path.lstrip("/")
            dst = os.path.join(args.dest, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                shutil.copyfile(path, dst)
            except OSError as e:
                print("skip %s: %s" % (path, e), file=sys.stderr)
                try:
                    os.unlink(dst)
                except OSError:
                    pass
                continue
            size = os.path.getsize(dst)
            os.chmod(dst, 0o755 if st.st_mode & 0o111 else 0o644)
            total += size
            nfiles += 1
            manifest.append("%d %s\n" % (size, path))
    if args.manifest:
        with open(args.manifest, "w") as f:
            f.writelines(manifest)
    print("files=%d bytes=%d" % (nfiles, total))
    if total < budget * 0.9:
        print("warning: only %d of %d bytes of binaries found in %s" % (total, budget, " ".join(args.sources)),
              file=sys.stderr)


# --------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------

def cmd_random(args):
    rng = random.Random(args.seed)
    left = args.bytes
    with open(args.dest, "wb") as f:
        while left > 0:
            n = min(CHUNK, left)
            f.write(rng.getrandbits(n * 8).to_bytes(n, "little"))
            left -= n
    print("files=1 bytes=%d" % args.bytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("text")
    t.add_argument("dest")
    t.add_argument("--bytes", type=int, required=True)
    t.add_argument("--seed", type=int, default=1)
    b = sub.add_parser("bins")
    b.add_argument("dest")
    b.add_argument("--bytes", type=int, required=True)
    b.add_argument("--manifest")
    b.add_argument("sources", nargs="+")
    r = sub.add_parser("random")
    r.add_argument("dest", help="output file")
    r.add_argument("--bytes", type=int, required=True)
    r.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    {"text": cmd_text, "bins": cmd_bins, "random": cmd_random}[args.cmd](args)


if __name__ == "__main__":
    main()
