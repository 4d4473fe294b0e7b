import enum


class AscendDeviceType(enum.Enum):
    A2 = 0
    A3 = 1
    A5 = 2


DEVICE = AscendDeviceType.A5  # tests set this before (re)loading device_op


def get_ascend_device_type() -> AscendDeviceType:
    return DEVICE
