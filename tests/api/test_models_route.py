"""GET /models names each β schedule as people do: a cosine checkpoint's config says diffusers'
"squaredcos_cap_v2" (what `ddpm train --beta-schedule cosine` writes, for diffusers to load it), the
listing and the page say "cosine"; a config that lists its betas says "trained"."""

from __future__ import annotations

import pytest

from app.nets import SchedulerConfig, UNet, UNetConfig, save_checkpoint
from tests.api.conftest import live_server, server_settings

pytestmark = pytest.mark.service


def test_schedules_are_listed_by_their_common_names(tmp_path):
    config = UNetConfig.ddpm(
        resolution=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0
    )
    schedulers = {
        "cos": SchedulerConfig(num_train_timesteps=20, beta_schedule="cosine"),
        "lin": SchedulerConfig(num_train_timesteps=20),
        "own": SchedulerConfig(num_train_timesteps=3, trained_betas=(0.1, 0.2, 0.3)),
    }
    folders = [str(save_checkpoint(tmp_path / name, UNet(config), s)) for name, s in schedulers.items()]
    assert '"squaredcos_cap_v2"' in (tmp_path / "cos" / "scheduler_config.json").read_text()
    with live_server(server_settings(folders)) as live, live.client() as client:
        listed = {m["name"]: m["beta_schedule"] for m in client.get("/models").json()}
    assert listed == {"cos": "cosine", "lin": "linear", "own": "trained"}
