"""PatchGAN discriminator (2D for images, 3D for videos) and the hinge GAN losses for decoder fine-tuning."""
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """Strided convolutions down to a grid of real/fake logits, one per image patch (or space-time patch)."""

    def __init__(self, in_channels=3, channels=64, n_layers=3, video=False):
        super().__init__()
        if channels % 32:
            raise ValueError(f"discriminator channels must be a multiple of 32 (GroupNorm), got {channels}")
        conv = nn.Conv3d if video else nn.Conv2d
        self.video = video

        def down(c_in, c_out, stage):
            # Video: space shrinks at every stage, time only in the later ones (short clips keep >= 1 frame).
            if not video:
                return conv(c_in, c_out, 4, stride=2, padding=1)
            return conv(c_in, c_out, (3, 4, 4), stride=(2 if stage > 0 else 1, 2, 2), padding=1)

        layers, width = [down(in_channels, channels, 0), nn.LeakyReLU(0.2)], channels
        for stage in range(1, n_layers):
            out = channels * min(2 ** stage, 8)
            layers += [down(width, out, stage), nn.GroupNorm(32, out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(conv(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        """x: (B,3,H,W) images, or (B,3,T,H,W) videos (the 2D model scores their frames separately)."""
        if x.dim() == 5 and not self.video:
            x = x.transpose(1, 2).flatten(0, 1)
        return self.net(x)


def hinge_d_loss(real_logits, fake_logits):
    """Discriminator hinge loss: push real logits above +1 and fake logits below -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits):
    """Generator side of the hinge GAN: raise the discriminator's score of the decoded images."""
    return -fake_logits.mean()
