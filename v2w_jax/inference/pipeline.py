"""Video2World generation: VAE-encode the conditional frames, sample latents with the DiT, decode.

The pieces, each jitted once (``jax.jit`` then caches one executable per input shape):

* ``encode``: uint8 conditional frames [1, 3, 1 + 4 (N-1), H, W] -> clean latents, zero-padded to the
  clip's latent length (only conditional frames of the padding are ever read; see ``conditioning.py``);
* ``sample``: the sampler of the training objective (``diffusion/samplers.make_sampler``): for rectified
  flow the reference's UniPC sampler, for EDM the reference's 2ab sampler on the EDM-preconditioned DiT
  (c_skip, c_out, c_in, c_noise; latents scaled by σ_data as the EDM model's encode/decode), with both
  CFG branches in ONE batch-2 DiT call per step; built once per (sampler settings, guided) — the
  guidance value itself is a traced scalar, so changing it does not recompile;
* ``decode``: latents -> uint8 frames [T, H, W, 3] = round(255 clip((x + 1) / 2, 0, 1)), done on device.

Parameters are arguments of the jitted functions (never baked-in constants), so the trainer's sample
callback (``training/samples.py``) reuses one pipeline with new (possibly FSDP-sharded) weights each time:
``pipeline.sample_latents(..., dit_params=...)``. On a mesh, results come back replicated, so every
process of a multi-process run can read them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v2w_jax.diffusion import guidance as guidance_lib
from v2w_jax.diffusion import samplers
from v2w_jax.models import dit as dit_lib
from v2w_jax.models import vae as vae_lib
from v2w_jax.models.dit_config import DiTConfig

Array = jax.Array


def to_uint8_frames(video: Array) -> Array:
  """Decoded video [1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]: round(255 clip((x + 1) / 2))."""
  x = jnp.clip((video[0].astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
  return jnp.round(x * 255.0).astype(jnp.uint8).transpose(1, 2, 3, 0)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  """One sample to generate (batch size 1, as the reference's scheduler is).

  Attributes:
    text_embedding: [L, D] (or [1, L, D]) conditional text embedding.
    negative_text_embedding: [L, D] embedding of the unconditional branch (the negative prompt); None
      means all-zero text (the reference training callback's "no negative prompt").
    cond_frames: uint8 [3, 1 + 4 (N - 1), H, W] conditional pixel frames (None for N = 0).
    num_conditional_frames: N latent frames (0, 1, 2).
    num_frames: output pixel frames (1 + 4k).
    size: (H, W) output size.
    seed: initial noise = numpy RandomState(seed).standard_normal (the reference's, arch-invariant).
    guidance: g in v = v_c + g (v_c - v_u); 0 skips the unconditional branch (same result, half the work).
    num_steps, shift: the sampler grid (``shift``: rectified flow only).
  """

  text_embedding: Any
  negative_text_embedding: Any = None
  cond_frames: np.ndarray | None = None
  num_conditional_frames: int = 0
  num_frames: int = 93
  size: tuple[int, int] = (704, 1280)
  seed: int = 0
  guidance: float = 7.0
  num_steps: int = 35
  shift: float = 5.0


@dataclasses.dataclass
class GenerationResult:
  video: np.ndarray  # uint8 [T, H, W, 3]
  latents: np.ndarray  # float32 [1, C, t, h, w]
  timings: dict[str, float]  # seconds: encode, dit, decode, total (each includes its first-call compile)


class Video2WorldPipeline:
  """DiT + VAE + sampler. Build once; call :meth:`generate` for each sample.

  ``objective`` (``diffusion/objective.make_objective(config)``) selects the sampler and its settings:
  rectified flow (the default, also for None) or EDM. ``dit_params`` may be None when every call passes
  its own (the trainer's sample callback).
  """

  def __init__(
      self,
      dit_cfg: DiTConfig,
      vae_cfg: vae_lib.VAEConfig,
      dit_params: Any,
      vae_params: Any,
      *,
      objective: Any = None,
      guidance_form: str = "video2world",
      use_karras_sigmas: bool = False,
      text_dtype: Any = jnp.bfloat16,
      mesh: jax.sharding.Mesh | None = None,
  ):
    if dit_cfg.in_channels != vae_cfg.z_dim or dit_cfg.out_channels != vae_cfg.z_dim:
      raise ValueError(f"DiT in/out channels {dit_cfg.in_channels}/{dit_cfg.out_channels} != VAE z_dim "
                       f"{vae_cfg.z_dim}")
    self.dit_cfg, self.vae_cfg = dit_cfg, vae_cfg
    self.mesh = mesh
    self.dit_params = None if dit_params is None else self.put(dit_params)
    self.vae_params = self.put(vae_params)
    self.objective = objective
    self.guidance_form = guidance_form
    self.use_karras_sigmas = bool(use_karras_sigmas)
    self.text_dtype = text_dtype
    self._apply = dit_lib.apply_fn(dit_cfg)
    self._sample_fns: dict[tuple, Any] = {}
    self._encode = self._jit(self._encode_impl, static_argnums=(2,))
    self._decode = self._jit(self._decode_impl)
    self._normalize = self._jit(lambda mu: vae_lib.normalize_latents(self.vae_cfg, mu))

  # ---- devices --------------------------------------------------------------------------------
  def _replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def _jit(self, fn, **kwargs):
    """``jax.jit``; on a mesh with replicated outputs (readable by every process)."""
    if self.mesh is not None:
      kwargs["out_shardings"] = self._replicated()
    return jax.jit(fn, **kwargs)

  def put(self, tree: Any) -> Any:
    """Device arrays: replicated over the mesh when there is one (params of the 2B DiT fit one GPU).

    Arrays already laid out on this mesh (e.g. the trainer's FSDP-sharded parameters) are left as they are.
    """
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, tree)
    rep = self._replicated()
    multi = jax.process_count() > 1

    def one(x):
      if isinstance(x, jax.Array):
        sh = x.sharding
        if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == self.mesh:
          return x
        if multi and x.is_fully_addressable:
          x = np.asarray(x)  # a process-local array: every process holds the same value (host round trip)
      return jax.device_put(x, rep)

    return jax.tree.map(one, tree)

  def _mesh_scope(self):
    """``jax.set_mesh(mesh)``: binds the model's logical activation constraints (batch over data,
    tokens over context) to the mesh; a no-op context without one."""
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  # ---- shapes ---------------------------------------------------------------------------------
  @property
  def size_multiple(self) -> int:
    return self.vae_cfg.spatial_factor * self.dit_cfg.patch_spatial

  def latent_shape(self, num_frames: int, size: Sequence[int]) -> tuple[int, int, int, int, int]:
    """[1, C, 1 + (T-1)/4, H/8, W/8], checking T = 1 + 4k and H, W multiples of 16."""
    tf, sf = self.vae_cfg.temporal_factor, self.vae_cfg.spatial_factor
    h, w = (int(s) for s in size)
    if num_frames < 1 or (num_frames - 1) % tf:
      raise ValueError(f"num_frames={num_frames} is not 1 + {tf}k")
    m = self.size_multiple
    if h % m or w % m or h <= 0 or w <= 0:
      raise ValueError(f"size {h}x{w}: height and width must be positive multiples of {m}")
    t = 1 + (num_frames - 1) // tf
    if t % self.dit_cfg.patch_temporal:
      raise ValueError(f"{t} latent frames not divisible by patch_temporal={self.dit_cfg.patch_temporal}")
    return (1, self.vae_cfg.z_dim, t, h // sf, w // sf)

  # ---- jitted pieces --------------------------------------------------------------------------
  def _encode_impl(self, vae_params: Any, frames_uint8: Array, num_latent_frames: int) -> Array:
    lat = vae_lib.encode_video(self.vae_cfg, vae_params, vae_lib.uint8_to_unit_range(frames_uint8))
    pad = num_latent_frames - lat.shape[2]
    return jnp.pad(lat, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))

  def _decode_impl(self, vae_params: Any, latents: Array) -> Array:
    return to_uint8_frames(vae_lib.decode_latents(self.vae_cfg, vae_params, latents))

  def sampler(self, num_steps: int, shift: float) -> samplers.Sampler:
    """The objective's sampler settings for one run (``shift`` applies to rectified flow only)."""
    return samplers.make_sampler(self.objective, num_steps, shift, use_karras_sigmas=self.use_karras_sigmas,
                                 guidance_form=self.guidance_form)

  def sample_fn(self, num_steps: int, shift: float, guided: bool):
    """The jitted ``(dit_params, noise, text, uncond_text, gt, mask, guidance) -> latents``.

    ``gt`` and the result are normalised VAE latents for either objective."""
    sampler = self.sampler(num_steps, shift)
    key = (sampler, bool(guided))
    if key not in self._sample_fns:
      apply = self._apply

      def run(dit_params, noise, text, uncond_text, gt, mask, guidance):
        def net(x, timesteps, txt, m):
          # The DiT takes the condition mask at full latent size [B, 1, T, H, W].
          m = jnp.broadcast_to(m, (x.shape[0], 1) + x.shape[2:]).astype(x.dtype)
          return apply(dit_params, x, timesteps, txt, m)

        return sampler(net, noise, text_embeddings=text, uncond_text_embeddings=uncond_text if guided else None,
                       gt_latents=gt, cond_mask=mask, guidance=guidance if guided else 0.0)

      self._sample_fns[key] = self._jit(run)
    return self._sample_fns[key]

  # ---- steps ----------------------------------------------------------------------------------
  def text_embedding(self, emb: Any) -> Array:
    """[L, D] or [1, L, D] -> [1, L, D] in the text dtype, checking the DiT's text width."""
    arr = jnp.asarray(emb)
    if arr.ndim == 2:
      arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[-1] != self.dit_cfg.text_in_channels:
      raise ValueError(f"text embedding must be [L, {self.dit_cfg.text_in_channels}] (or [1, L, D]), "
                       f"got {tuple(np.shape(emb))}")
    return arr.astype(self.text_dtype)

  def encode_conditional(self, cond_frames: np.ndarray | None, latent_shape: Sequence[int],
                         num_conditional_frames: int, vae_params: Any = None) -> Array | None:
    """Clean latents [1, C, t, h, w] of the conditional frames (zeros after them); None for N = 0."""
    if num_conditional_frames == 0:
      return None
    if cond_frames is None:
      raise ValueError(f"{num_conditional_frames} conditional frame(s) requested but no cond_frames given")
    frames = np.asarray(cond_frames)
    need = 1 + self.vae_cfg.temporal_factor * (num_conditional_frames - 1)
    _, _, t, h, w = latent_shape
    sf = self.vae_cfg.spatial_factor
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != 3 or frames.shape[1] < need \
        or frames.shape[2:] != (h * sf, w * sf):
      raise ValueError(f"cond_frames must be uint8 [3, >= {need}, {h * sf}, {w * sf}], got "
                       f"{frames.shape} {frames.dtype}")
    params = self.vae_params if vae_params is None else self.put(vae_params)
    with self._mesh_scope():
      return self._encode(params, self.put(frames[None, :, :need]), int(t))

  def latents_from_means(self, means: Any) -> Array:
    """Clean latents [1, C, t, h, w] from VAE posterior means (what a latent cache stores)."""
    with self._mesh_scope():
      return self._normalize(self.put(means))

  def sample_latents(self, latent_shape: Sequence[int], text: Array, uncond_text: Array | None, gt: Array | None,
                     num_conditional_frames: int, *, seed: int, guidance: float, num_steps: int, shift: float,
                     dit_params: Any = None, noise: Array | None = None) -> Array:
    """Runs the sampler; returns float32 latents [1, C, t, h, w]."""
    shape = tuple(int(s) for s in latent_shape)
    if noise is None:
      noise = guidance_lib.initial_noise(shape, seed)
    mask = guidance_lib.conditional_frame_mask(num_conditional_frames, 1, shape[2], jnp.float32)
    gt = jnp.zeros(shape, jnp.float32) if gt is None else gt
    guided = float(guidance) != 0.0
    if guided and uncond_text is None:
      uncond_text = jnp.zeros_like(text)
    if guided and uncond_text.shape != text.shape:
      raise ValueError(f"negative text embedding shape {tuple(uncond_text.shape)} != text embedding shape "
                       f"{tuple(text.shape)} (both CFG branches run in one batch)")
    fn = self.sample_fn(num_steps, shift, guided)
    params = self.dit_params if dit_params is None else self.put(dit_params)
    if params is None:
      raise ValueError("no DiT parameters: the pipeline was built without them, pass dit_params")
    args = self.put((noise, text, uncond_text if guided else text, gt, mask, jnp.float32(guidance)))
    with self._mesh_scope():
      return fn(params, *args)

  def decode(self, latents: Array, vae_params: Any = None) -> Array:
    """uint8 frames [T, H, W, 3] (on device)."""
    with self._mesh_scope():
      return self._decode(self.vae_params if vae_params is None else self.put(vae_params), latents)

  def generate(self, req: GenerationRequest, *, dit_params: Any = None, vae_params: Any = None
               ) -> GenerationResult:
    """Encode -> sample -> decode for one request, timing each stage (blocking on its result)."""
    t0 = time.perf_counter()
    shape = self.latent_shape(req.num_frames, req.size)
    if not 0 <= req.num_conditional_frames < shape[2]:
      raise ValueError(f"num_conditional_frames={req.num_conditional_frames} must be in [0, {shape[2]}) for "
                       f"{req.num_frames} frames")
    text = self.text_embedding(req.text_embedding)
    uncond = None if req.negative_text_embedding is None else self.text_embedding(req.negative_text_embedding)
    gt = self.encode_conditional(req.cond_frames, shape, req.num_conditional_frames, vae_params)
    if gt is not None:
      gt.block_until_ready()
    t1 = time.perf_counter()
    latents = self.sample_latents(shape, text, uncond, gt, req.num_conditional_frames, seed=req.seed,
                                  guidance=req.guidance, num_steps=req.num_steps, shift=req.shift,
                                  dit_params=dit_params)
    latents.block_until_ready()
    t2 = time.perf_counter()
    frames = np.asarray(self.decode(latents, vae_params))
    t3 = time.perf_counter()
    timings = dict(encode=t1 - t0, dit=t2 - t1, decode=t3 - t2, total=t3 - t0)
    return GenerationResult(video=frames, latents=np.asarray(latents), timings=timings)
