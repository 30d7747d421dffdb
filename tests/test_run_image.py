"""scripts/run_image.py's path and user resolution: what an image says is read inside its own root filesystem,
never the host's (an image's /var/run -> /run symlink once led a bind mount to the host's /run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from run_image import in_root, resolve_user


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # absolute, as in Debian images
    (root / "etc").mkdir()
    (root / "etc" / "alternatives").mkdir()
    (root / "etc" / "hosts.d").symlink_to("alternatives")  # relative
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                         "kubetune:x:10001:10001::/nonexistent:/usr/sbin/nologin\n")
    (root / "etc" / "group").write_text("root:x:0:\nkubetune:x:10001:\nray:x:1000:\n")
    return root


def test_an_absolute_symlink_resolves_inside_the_image(rootfs: Path) -> None:
    assert in_root(rootfs, "/var/run/secrets/kubeconfig") == rootfs / "run" / "secrets" / "kubeconfig"


def test_a_relative_symlink_resolves_beside_itself(rootfs: Path) -> None:
    assert in_root(rootfs, "/etc/hosts.d/x") == rootfs / "etc" / "alternatives" / "x"


def test_dot_dot_stops_at_the_images_root(rootfs: Path) -> None:
    assert in_root(rootfs, "/../../etc/passwd") == rootfs / "etc" / "passwd"
    (rootfs / "escape").symlink_to("../../..")
    assert in_root(rootfs, "/escape/etc") == rootfs / "etc"


def test_a_symlink_loop_is_refused(rootfs: Path) -> None:
    (rootfs / "loop").symlink_to("/loop")
    with pytest.raises(OSError, match="too many symlinks"):
        in_root(rootfs, "/loop/x")


@pytest.mark.parametrize(("user", "expected"), [
    ("10001:10001", (10001, 10001, "/nonexistent")),
    ("10001", (10001, 10001, "/nonexistent")),
    ("kubetune", (10001, 10001, "/nonexistent")),
    ("kubetune:ray", (10001, 1000, "/nonexistent")),
    ("4242:4242", (4242, 4242, "/")),  # a UID the image does not list runs as given, home /
])
def test_the_images_user_is_read_from_its_own_passwd(rootfs: Path, user: str, expected: tuple[int, int, str]) -> None:
    assert resolve_user(rootfs, user) == expected


def test_an_unknown_user_name_is_refused(rootfs: Path) -> None:
    with pytest.raises(ValueError, match="nobody"):
        resolve_user(rootfs, "nobody")
