"""Compile zokern's Triton kernels for an H100 (sm_90) without a GPU and print facts about their PTX as JSON.

Run by tests/test_triton.py in a process without TRITON_INTERPRET (which would replace the kernels by Python).
"""

import json
import re

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
LDSD_SIGNATURE = {
    "table_ptr": "*i64",
    "seeds_ptr": "*i64",
    "coef_ptr": "*fp32",
    "partial_ptr": "*fp32",
    **{name: "fp32" for name in ("lr", "weight_decay", "momentum", "beta1", "beta2", "adam_eps")},
    "rounding_seed": "i64",
}


def compile_ptx(fn, signature, constexprs) -> str:
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
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
                signature = PASS_SIGNATURE
                if scalars:  # as the graph launches it: placeholder seeds of 0, which Triton types as i32
                    signature = dict(signature, seed="i32", seed2="i32", rounding_seed="i32")
                ptx = compile_ptx(zo_pass._zo_pass_kernel, signature, constexprs)
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
        signature = {"table_ptr": "*i64", "seed": "i64", "alpha": "fp32", "seed2": "i64", "alpha2": "fp32"}
        constexprs = dict(DTYPE=getattr(tl, dtype), RADEMACHER=False, SECOND=False, ALIGNED=True, BLOCK=2048)
        out[f"copy_pass_{dtype}"] = facts(compile_ptx(copy_pass._copy_pass_kernel, signature, constexprs))
    for reduce in (False, True):
        signature = {"table_ptr": "*i64", "seed": "i64", "coef_ptr": "*fp32", "partial_ptr": "*fp32"}
        constexprs = dict(DTYPE=tl.float32, REDUCE=reduce, BLOCK=zopro_pass.GPU_BLOCK)
        out[f"zopro_{'reduce' if reduce else 'apply'}"] = facts(
            compile_ptx(zopro_pass._zopro_kernel, signature, constexprs)
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
