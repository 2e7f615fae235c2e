"""python -m attnfast info: versions, CPU ISA path, GPU, backends.
python -m attnfast bench SUITE [options]: the benchmarks (attnfast.bench; --list shows the suites)."""
import platform
import sys

import torch


def info():
    import attnfast
    from attnfast import ops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"attnfast  {attnfast.__version__}",
        f"torch     {torch.__version__}",
        f"triton    {triton_version}",
        f"python    {platform.python_version()}",
        f"cpu       {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        f"cpu ISA   {ops._C.cpu_isa() if ops.loaded() else 'n/a (extension not built)'}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}     {p.name} (sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("gpu       none")
    lines.append("backends:")
    lines += [f"  {st}" for st in attnfast.backends().values()]
    return "\n".join(lines)


def _bench(argv):
    try:
        from attnfast.bench import main as bench_main
    except ModuleNotFoundError as e:
        if e.name != "attnfast.bench":
            raise
        print(f"attnfast.bench cannot be imported ({e}): install attnfast (`pip install .`), or in a source "
              "checkout redo the editable install (`make build`)", file=sys.stderr)
        return 2
    return bench_main(argv)


def main(argv):
    if argv[:1] == ["info"]:
        print(info())
        return 0
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    print("usage: python -m attnfast info\n       python -m attnfast bench SUITE [options]   (--list: the suites)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
