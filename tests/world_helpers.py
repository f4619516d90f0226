"""Real sample images on other grids (permuted, flipped, oblique, anisotropic) with the same world content."""

import numpy as np
from scipy import ndimage as ndi

from ppreg.data import load_sample
from ppreg.image import Image
from ppreg.itk import embed3
from ppreg.space import reduce_affine


def small_2d() -> Image:
    """The ITK proton-density slice at 2 mm (109, 91), x and y flipped (an LPS-like header) and shifted."""
    img = load_sample("BrainProtonDensitySlice")
    return Image(img.data[::2, ::2], np.array([[-2.0, 0, 0, 90.0], [0, -2.0, 0, 110.0], [0, 0, 1, 0], [0, 0, 0, 1]]))


def small_3d() -> Image:
    """Colin27 T1 cropped and subsampled to 4 mm, (32, 40, 32) voxels (RAS header)."""
    img = load_sample("colin27_t1_2mm")
    step = np.diag([2.0, 2.0, 2.0, 1.0])
    step[:3, 3] = (14, 16, 10)
    return Image(img.data[14:78:2, 16:96:2, 10:74:2], img.affine @ step)


def grid_of(image: Image, perm, flips, spacing, rotation=None):
    """A grid over ``image``'s field of view with axes permuted (moving axis a along fixed axis perm[a]),
    flipped, ``spacing`` mm per axis and, optionally, rotated in world by ``rotation`` ((d, d), about the
    image centre): returns ``(4x4 affine, shape)``."""
    d = image.ndim
    w_f = reduce_affine(image.affine, d)
    sp_f = np.linalg.norm(w_f[:d, :d], axis=0)
    index = np.zeros((d + 1, d + 1))
    index[d, d] = 1.0
    shape = []
    for a, (axis, flip, sp) in enumerate(zip(perm, flips, spacing)):
        extent = (image.shape[axis] - 1) * sp_f[axis]
        n = int(np.floor(extent / sp + 1e-9)) + 1
        index[axis, a] = (-1.0 if flip else 1.0) * sp / sp_f[axis]
        index[axis, d] = image.shape[axis] - 1 if flip else 0.0
        shape.append(n)
    w_m = w_f @ index
    if rotation is not None:
        centre = w_f[:d, :d] @ ((np.asarray(image.shape) - 1) / 2.0) + w_f[:d, d]
        rot = np.eye(d + 1)
        rot[:d, :d] = rotation
        rot[:d, d] = centre - rotation @ centre
        w_m = rot @ w_m
    return embed3(w_m), tuple(shape)


def resample_world(image: Image, affine, shape, motion=None, order=3) -> Image:
    """``image``'s world content on another grid, moved by ``motion`` ((d+1)^2 world matrix, fixed mm ->
    moving mm, so that registering ``image`` (fixed) to the result gives ``motion``): voxel ``y`` holds
    ``image(W_f^-1 motion^-1 W y)`` (0 outside)."""
    d = image.ndim
    w_f = reduce_affine(image.affine, d)
    w_m = reduce_affine(affine, d)
    motion = np.eye(d + 1) if motion is None else motion
    index = np.linalg.solve(w_f, np.linalg.solve(motion, w_m))
    data = ndi.affine_transform(image.data, index[:d, :d], offset=index[:d, d], output_shape=shape, order=order,
                                mode="constant", cval=0.0)
    return Image(data.astype(np.float32), affine)


def rotation(angle_deg, axis=None):
    """2D rotation by an angle, or 3D about ``axis`` (Rodrigues)."""
    a = np.radians(angle_deg)
    if axis is None:
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def rigid(rot, translation, centre):
    """Homogeneous world rigid motion ``y -> rot (y - centre) + centre + translation``."""
    d = len(translation)
    out = np.eye(d + 1)
    out[:d, :d] = rot
    out[:d, d] = np.asarray(centre) + np.asarray(translation) - rot @ np.asarray(centre)
    return out


def world_rms(t_a, t_b, image: Image) -> float:
    """RMS distance (mm) between two world transforms over the voxel centres of ``image``."""
    d = image.ndim
    w = reduce_affine(image.affine, d)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in image.shape], indexing="ij"), -1).reshape(-1, d)
    pts = grid @ w[:d, :d].T + w[:d, d]
    diff = pts @ (t_a[:d, :d] - t_b[:d, :d]).T + (t_a[:d, d] - t_b[:d, d])
    return float(np.sqrt(np.mean(np.sum(diff**2, axis=-1))))
