"""MP4/GIF writers produce decodable files with the right frame count; contact sheets have the expected grid."""
import numpy as np
import pytest

from jaxvc.media import contact_sheet, to_uint8, write_gif, write_mp4


def test_mp4_and_gif_round_trip(tmp_path):
    av = pytest.importorskip("av")
    from PIL import Image

    frames = np.zeros((6, 32, 32, 3), np.uint8)
    for i in range(6):
        frames[i, :, i * 5:(i * 5) + 6] = 255  # a bar that moves right
    mp4 = write_mp4(tmp_path / "v.mp4", frames, fps=6)
    with av.open(str(mp4)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 6
    assert decoded[0].shape == (128, 128, 3)  # upscaled 4x for viewing
    # the bright bar moves right: its mean column increases frame to frame
    centers = [np.nonzero(d[..., 0].mean(0) > 128)[0].mean() for d in decoded]
    assert all(b > a for a, b in zip(centers, centers[1:]))
    gif = write_gif(tmp_path / "v.gif", frames)
    with Image.open(gif) as image:
        assert image.n_frames == 6
    assert not list(tmp_path.glob("*.tmp*"))


def test_contact_sheet_layout_and_float_input():
    video = np.linspace(-1, 1, 4 * 8 * 8 * 3).reshape(4, 8, 8, 3).astype(np.float32)
    assert to_uint8(video).min() == 0 and to_uint8(video).max() == 255
    sheet = contact_sheet([video[:1], video], labels=["reference", "generated"], cell=16)
    assert sheet.size[1] == 2 * 18
    assert sheet.size[0] >= 4 * 18


def test_bad_shape_is_reported(tmp_path):
    with pytest.raises(ValueError, match=r"expected frames of shape \(F, H, W, 3\)"):
        write_gif(tmp_path / "x.gif", np.zeros((4, 8, 8), np.uint8))


@pytest.mark.parametrize("fps", [8, 16, 24])
def test_gif_delays_add_up_to_the_video_length(tmp_path, fps):
    """GIF delays are centiseconds: rounded frame by frame they would drift (8 fps as 120 ms: 4 % fast); spread, a
    16-frame video lasts 16 / fps seconds to 5 ms and no frame is off by more than one centisecond."""
    from PIL import Image

    frames = np.stack([np.full((16, 16, 3), 10 * i, np.uint8) for i in range(16)])
    gif = write_gif(tmp_path / "v.gif", frames, fps=fps)
    with Image.open(gif) as image:
        delays = []
        for index in range(image.n_frames):
            image.seek(index)
            delays.append(image.info["duration"])
    assert len(delays) == 16 and all(d % 10 == 0 for d in delays)
    assert abs(sum(delays) - 16 * 1000 / fps) <= 5
    assert max(delays) - min(delays) <= 10


def test_contact_sheet_tiles_keep_the_frames_aspect_ratio():
    wide = np.zeros((2, 48, 84, 3), np.uint8)  # a 480 x 832 frame's shape, reduced
    wide[:, :, 42:] = 255  # right half white: stays the right half of each tile
    reference = np.full((1, 32, 32, 3), 128, np.uint8)
    sheet = np.asarray(contact_sheet([reference, wide], cell=24))
    width = round(24 * 84 / 48)
    assert sheet.shape == (2 * 26, 2 * (width + 2), 3)
    tile = sheet[26:26 + 24, :width]
    assert tile[:, : width // 2 - 1].max() == 0 and tile[:, width // 2 + 1:].min() == 255
    assert (sheet[:24, :24] == 128).all() and (sheet[:24, 24:26] == 255).all()  # the square reference: 24 x 24


def test_16_bit_and_transparent_images_read_as_their_8_bit_picture(tmp_path):
    """PIL's convert("RGB") clips a 16-bit grey PNG (mode I;16) to white: read_image and the pipelines' reference
    loader scale it to 8 bits; transparency (RGBA, or a palette's transparent index) goes on the given background;
    a float image is refused by name."""
    from PIL import Image

    from jaxvc.data.media import MediaError, read_image
    from jaxvc.pipeline import load_reference_image

    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(gradient).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I")  # what PIL opens a 16-bit PNG as
    pixels = read_image(str(tmp_path / "grey16.png"))
    np.testing.assert_array_equal(pixels[..., 0], (gradient >> 8).astype(np.uint8))
    assert pixels.shape == (8, 64, 3) and abs(pixels.mean() - 127.5) < 1
    reference = load_reference_image(str(tmp_path / "grey16.png"), 8, 64)
    np.testing.assert_allclose(reference[..., 0], (gradient >> 8) / 127.5 - 1, atol=1e-6)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "cutout.png", transparency=0)  # index 0 transparent, no alpha band
    cutout = read_image(str(tmp_path / "cutout.png"), background=(255, 255, 255))
    assert tuple(cutout[0, 0]) == (255, 255, 255) and tuple(cutout[1, 1]) == (200, 10, 10)

    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(MediaError, match="32-bit float image"):
        read_image(str(tmp_path / "float.tif"))


def test_masks_in_their_common_formats_mark_the_subject(tmp_path):
    """"non-zero = subject" for a palette (label) mask whose colour is dark (DAVIS' (128, 0, 0), luminance 38), a
    0/1 label mask and a 0/255 one; a JPEG's noise in the background stays background; a photo's EXIF orientation
    turns the picture (and its mask) upright."""
    from PIL import Image

    from jaxvc.data.media import read_image, read_mask

    subject = np.zeros((16, 16), bool)
    subject[4:12, 2:8] = True
    davis = Image.fromarray(subject.astype(np.uint8), "P")
    davis.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    davis.save(tmp_path / "davis.png")
    Image.fromarray(subject.astype(np.uint8)).save(tmp_path / "labels.png")
    Image.fromarray(subject.astype(np.uint8) * 255).save(tmp_path / "white.jpg", quality=70)
    for name in ("davis.png", "labels.png", "white.jpg"):
        np.testing.assert_array_equal(read_mask(str(tmp_path / name))[0], subject, err_msg=name)

    photo = np.zeros((20, 40, 3), np.uint8)
    photo[:, :20] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(photo).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_image(str(tmp_path / "phone.jpg"))
    assert upright.shape == (40, 20, 3)
    assert upright[:18].mean() > 200 and upright[22:].mean() < 50  # the stored left half is now the top
