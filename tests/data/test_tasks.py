import pytest

from gist_exp.data.tasks import GROUPS, TASKS, UnknownTaskError, canonical_task_name


def test_registry_matches_vtab_1k():
    assert len(TASKS) == 19
    assert [sum(t.group == g for t in TASKS.values()) for g in GROUPS] == [7, 4, 8]
    assert TASKS["sun397"].num_classes == 397 and TASKS["dsprites_loc"].test_size == 73_728
    assert sum(t.test_size for t in TASKS.values()) == 387_904  # SPEC table total (SPEC prose says ~420k)


@pytest.mark.parametrize("alias, name", [("cifar100", "cifar"), ("pets", "oxford_iiit_pet"), ("PET", "oxford_iiit_pet"),
                                         ("flowers102", "oxford_flowers102"), ("clevr_distance", "clevr_dist"),
                                         ("dsprites_orientation", "dsprites_ori"), ("dtd", "dtd")])
def test_aliases(alias, name):
    assert canonical_task_name(alias) == name


def test_unknown_task_names_the_valid_ones_and_close_matches():
    with pytest.raises(UnknownTaskError) as error:
        canonical_task_name("eurosatt")
    message = str(error.value)
    assert "unknown task 'eurosatt'" in message and "Did you mean: eurosat" in message
    assert "oxford_iiit_pet (oxford_pet, pets, pet)" in message and "smallnorb_ele" in message
