"""Compile zokern's Triton kernels for an H100 (sm_90) without a GPU and print facts about their PTX as JSON.

Run by tests/test_triton.py in a process without TRITON_INTERPRET (which would replace the kernels by Python).
`python tests/triton_ptx.py --all` instead compiles every variant the package can launch (about a thousand, 17 min on
2 cores) and reports failures: a check before a GPU session (.ci/rehearse_device.sh with TRITON_VARIANTS=all).
"""

import inspect
import itertools
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zokern.kernels import copy_pass
from zokern.kernels import ldsd_pass
from zokern.kernels import options
from zokern.kernels import zo_pass
from zokern.kernels import zopro_pass

H100 = GPUTarget("cuda", 90, 32)
# As zokern launches the pass, also with device scalars (a CUDA graph's step): the step's seeds, 63-bit and so typed
# i64 by Triton, ride along as arguments though the kernel then reads the row's.
PASS_SIGNATURE = {
    "table_ptr": "*i64",
    "seed": "i64",
    "alpha": "fp32",
    "seed2": "i64",
    "alpha2": "fp32",
    "lr": "fp32",
    "grad_ptr": "*fp32",
    "grad_value": "fp32",
    "weight_decay": "fp32",
    "rounding_seed": "i64",
    "scalars_ptr": "*i64",
}
FLAGS = ("UPDATE", "GRAD_ON_DEVICE", "SECOND", "STOCHASTIC")
COPY_SIGNATURE = {"table_ptr": "*i64", "seed": "i64", "alpha": "fp32", "seed2": "i64", "alpha2": "fp32"}
ZOPRO_SIGNATURE = {"table_ptr": "*i64", "seed": "i64", "coef_ptr": "*fp32", "partial_ptr": "*fp64"}
LDSD_SIGNATURE = {
    "table_ptr": "*i64",
    "seeds_ptr": "*i64",
    "coef_ptr": "*fp32",
    "partial_ptr": "*fp64",
    **dict.fromkeys(("lr", "weight_decay", "momentum", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2"), "fp32"),
    "adam_eps": "fp32",
    "rounding_seed": "i64",
}


def compile_ptx(fn, signature, constexprs) -> str:
    if "constexprs" in inspect.signature(ASTSource).parameters:  # triton >= 3.3
        signature = dict(signature, **{name: "constexpr" for name in constexprs})
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    else:  # triton 3.2: the constexprs are constants by name, outside the signature
        source = ASTSource(fn=fn, signature=signature, constants=constexprs)
    return triton.compile(source, target=H100, options=options.LAUNCH).asm["ptx"]  # as zokern launches them


def facts(ptx: str) -> dict:
    return {
        "vector_load": "ld.global.v4.b32" in ptx,
        "vector_store": "st.global.v4.b32" in ptx,
        "stores": "st.global" in ptx,
        "mul_hi_u32": "mul.hi.u32" in ptx,
        "local_memory": bool(re.search(r"\.local\b", ptx)),
        "fused_multiply_adds": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        "separately_rounded_products": len(re.findall(r"\bmul\.rn\.f32\b", ptx)),
    }


def main() -> None:
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        for distribution in ("gaussian", "rademacher"):
            for variant, flags, aligned, scalars in (
                ("aligned", False, True, False),
                ("aligned_all_flags", True, True, False),
                ("aligned_all_flags_device_scalars", True, True, True),  # as a CUDA graph captures it
                ("unaligned", True, False, False),
            ):
                constexprs = dict(
                    DTYPE=getattr(tl, dtype),
                    SCALARS=scalars,
                    RADEMACHER=distribution == "rademacher",
                    ALIGNED=aligned,
                    BLOCK=zo_pass.GPU_BLOCK,
                    **{name: flags for name in FLAGS},
                )
                constexprs["STOCHASTIC"] = flags and dtype != "float32"
                ptx = compile_ptx(zo_pass._zo_pass_kernel, PASS_SIGNATURE, constexprs)
                out[f"zo_pass_{dtype}_{distribution}_{variant}"] = facts(ptx)
    ptx = compile_ptx(
        zo_pass._philox_words_kernel,
        {"out_ptr": "*i64", "n_blocks": "i32", "seed": "i64", "first_block": "i64"},
        dict(DOMAIN=1, BLOCK=1024),
    )
    out["philox_words"] = facts(ptx)
    for mode, rule, dtype in (("move", "sgd", "bfloat16"), ("norm", "sgd", "float32"), ("move_norm", "sgd", "float32"),
                              ("final", "sgd", "float32"),
                              ("final", "momentum", "bfloat16"), ("final", "adam", "float16")):  # fmt: skip
        constexprs = dict(
            DTYPE=getattr(tl, dtype),
            RADEMACHER=False,
            N_SEEDS=5,
            MODE=ldsd_pass._MODES[mode],
            RULE=ldsd_pass._RULES[rule],
            STOCHASTIC=dtype != "float32",
            ALIGNED=True,
            BLOCK=ldsd_pass.GPU_BLOCK,
        )
        ptx = compile_ptx(ldsd_pass._ldsd_kernel, LDSD_SIGNATURE, constexprs)
        out[f"ldsd_{mode}_{rule}_{dtype}"] = facts(ptx)
    for dtype in ("float32", "bfloat16"):
        constexprs = dict(DTYPE=getattr(tl, dtype), RADEMACHER=False, SECOND=False, ALIGNED=True, BLOCK=2048)
        out[f"copy_pass_{dtype}"] = facts(compile_ptx(copy_pass._copy_pass_kernel, COPY_SIGNATURE, constexprs))
    for reduce in (False, True):
        constexprs = dict(DTYPE=tl.float32, REDUCE=reduce, BLOCK=zopro_pass.GPU_BLOCK)
        out[f"zopro_{'reduce' if reduce else 'apply'}"] = facts(
            compile_ptx(zopro_pass._zopro_kernel, ZOPRO_SIGNATURE, constexprs)
        )
    print(json.dumps(out, indent=1))


def _variants():
    """(kernel name, signature, constexprs) of every variant, fp32 without stochastic rounding (never launched)."""
    dtypes, flags = ("float32", "bfloat16", "float16"), (False, True)
    for dtype, rademacher, scalars, aligned, *pass_flags in itertools.product(dtypes, *[flags] * 7):
        constexprs = dict(zip(FLAGS, pass_flags), DTYPE=dtype, SCALARS=scalars, RADEMACHER=rademacher, ALIGNED=aligned)
        if not (constexprs["STOCHASTIC"] and dtype == "float32"):
            yield "zo_pass", PASS_SIGNATURE, dict(constexprs, BLOCK=zo_pass.GPU_BLOCK)
    ldsd_choices = (dtypes, flags, (1, 2, 5), ldsd_pass._MODES.values(), ldsd_pass._RULES.values(), flags, flags)
    for dtype, rademacher, n_seeds, mode, rule, stochastic, aligned in itertools.product(*ldsd_choices):
        if not (stochastic and dtype == "float32"):
            constexprs = dict(DTYPE=dtype, RADEMACHER=rademacher, N_SEEDS=n_seeds, MODE=mode, RULE=rule)
            constexprs.update(STOCHASTIC=stochastic, ALIGNED=aligned, BLOCK=ldsd_pass.GPU_BLOCK)
            yield "ldsd", LDSD_SIGNATURE, constexprs
    for dtype, rademacher, second, aligned in itertools.product(dtypes, flags, flags, flags):
        constexprs = dict(DTYPE=dtype, RADEMACHER=rademacher, SECOND=second, ALIGNED=aligned, BLOCK=2048)
        yield "copy_pass", COPY_SIGNATURE, constexprs
    for dtype, reduce in itertools.product(dtypes, flags):
        yield "zopro", ZOPRO_SIGNATURE, dict(DTYPE=dtype, REDUCE=reduce, BLOCK=zopro_pass.GPU_BLOCK)


KERNELS = {
    "zo_pass": zo_pass._zo_pass_kernel,
    "ldsd": ldsd_pass._ldsd_kernel,
    "copy_pass": copy_pass._copy_pass_kernel,
    "zopro": zopro_pass._zopro_kernel,
}


def _compile_variant(variant) -> str | None:
    name, signature, constexprs = variant
    try:
        compile_ptx(KERNELS[name], signature, dict(constexprs, DTYPE=getattr(tl, constexprs["DTYPE"])))
    except Exception as e:  # noqa: BLE001 - every failure is reported with its variant
        return f"{name} {constexprs}: {type(e).__name__}: {str(e)[:400]}"
    return None


def compile_all() -> int:
    variants = list(_variants())
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        failures = [f for f in pool.map(_compile_variant, variants, chunksize=4) if f is not None]
    print("\n".join(failures))
    compiled = len(variants) - len(failures)
    print(f"{compiled} of {len(variants)} Triton variants compiled for sm_90 (triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(compile_all()) if sys.argv[1:] == ["--all"] else main()
