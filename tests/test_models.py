"""The model family: sizes from the paper, input contract, and no stale attention-bias caches."""
import pytest
import torch

from levit_deploy.checkpoints import load, randomize_
from levit_deploy.families.base import count_parameters
from levit_deploy.families.levit.config import VARIANTS, get_config
from levit_deploy.families.levit.model import Levit, count_flops


def create_model(name, num_classes=None, distilled=None):
    return Levit(get_config(name, num_classes, distilled)).eval()

PARAMS = {"levit_128s": 7_777_058, "levit_128": 9_213_936, "levit_192": 10_947_069,
          "levit_256": 18_893_876, "levit_384": 39_128_836}
PAPER_MFLOPS = {"levit_128s": 305, "levit_128": 406, "levit_192": 658, "levit_256": 1120, "levit_384": 2353}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_and_flops_match_the_paper(name):
    model = create_model(name)
    assert count_parameters(model) == PARAMS[name]
    assert count_flops(model.config) / 1e6 == pytest.approx(PAPER_MFLOPS[name], rel=0.01)


def test_other_sizes_are_refused_with_the_reason():
    model = create_model("levit_128s")
    with pytest.raises(ValueError, match="only the batch size may vary"):
        model(torch.zeros(1, 3, 256, 256))


def test_non_distilled_and_class_count():
    model = create_model("levit_128s", num_classes=7, distilled=False)
    assert model.head_dist is None
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 7)


def test_bias_lookup_never_goes_stale():
    """load_state_dict after eval(), then a dtype change: the bias must follow the parameters."""
    x = torch.randn(1, 3, 224, 224)
    a = randomize_(Levit(get_config("levit_128s")), seed=1).eval()
    b = randomize_(Levit(get_config("levit_128s")), seed=2).eval()
    with torch.no_grad():
        a(x)  # an eval forward, as a cache would be filled by one
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x))
        a64 = a.double()
        assert a64.stages[0].blocks[0].attn.bias_table().dtype == torch.float64
        assert torch.allclose(a64(x.double()), b.double()(x.double()), atol=1e-8)


def test_random_init_is_seeded():
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(load("levit_128s", init="random", seed=3)(x), load("levit_128s", init="random", seed=3)(x))
        assert not torch.equal(load("levit_128s", init="random", seed=3)(x), load("levit_128s", init="random", seed=4)(x))
