"""The Triton kernels compile for a real GPU target (sm_90, Hopper) on a machine without a GPU.

Triton's interpreter (the other CPU tests) runs the kernels as Python and accepts code that the compiler
rejects (types, scalar/block mixing, unsupported float64 math).  Here every variant the backend launches is
compiled ahead of time down to a cubin with the ptxas that the triton wheel ships, in a subprocess without
TRITON_INTERPRET.  Skipped when triton or its bundled ptxas is missing.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from drgs_core.cuda import _triton_hashgrid, _triton_raster, _triton_voxel

    f32, i32 = "*fp32", "*i32"
    target = GPUTarget("cuda", 90, 32)

    def build(kernel, types, constexprs, **options):
        sig = dict(types, **{name: "constexpr" for name in constexprs})
        compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=target,
                                  options=dict(num_warps=4, **options))
        assert compiled.asm["cubin"], kernel
        print("compiled", kernel.__name__, sorted(constexprs.items()), flush=True)

    for backward in (False, True):
        for has_m2 in (False, True):
            build(_triton_raster._project_kernel,
                  dict(means_ptr=f32, scales_ptr=f32, rot_ptr=f32, rho_ptr=f32, m2_ptr=f32, cam_ptr="*fp64",
                       prm_ptr=f32, box_ptr=i32, radii_ptr=f32 if backward else i32,
                       visible_ptr=f32 if backward else "*i8", centres_ptr=f32, sums_ptr=f32, gmeans_ptr=f32,
                       gscales_ptr=f32, grot_ptr=f32, grho_ptr=f32, gm2_ptr=f32, P="i32", W="i32", H="i32"),
                  dict(HAS_M2=has_m2, BACKWARD=backward, BLOCK=_triton_raster.PROJECT_BLOCK))
        build(_triton_raster._splat_kernel, dict(prm_ptr=f32, box_ptr=i32, img_ptr=f32, sums_ptr=f32, W="i32"),
              dict(BACKWARD=backward, BLOCK=_triton_raster.BLOCK))
        build(_triton_hashgrid._hash_kernel,
              dict(x_ptr=f32, table_ptr=f32, res_ptr=i32, off_ptr="*i64", hashed_ptr=i32, out_ptr=f32, gout_ptr=f32,
                   gtable_ptr=f32, gx_ptr=f32, P="i32", table_mask="i32"),
              dict(D=4, F=2, L=4, BACKWARD=backward, NEED_TABLE=backward, NEED_X=backward,
                   BLOCK=_triton_hashgrid.BLOCK), **_triton_hashgrid._NO_FMA)
    build(_triton_voxel._voxel_kernel,
          dict(means_ptr=f32, scales_ptr=f32, rot_ptr=f32, rho_ptr=f32, grid_ptr="*fp64", vol_ptr=f32,
               n0="i32", n1="i32", n2="i32"),
          dict(SIGMAS=3.0, BLOCK=_triton_voxel.BLOCK), **_triton_voxel._NO_FMA)
''')


def test_triton_kernels_compile_for_sm90(tmp_path):
    triton = pytest.importorskip("triton")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 4):
        pytest.skip(f"triton {triton.__version__}: this test uses the ahead-of-time API of triton >= 3.4")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("compiled") == 9, proc.stdout
