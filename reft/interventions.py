"""The ReFT family, by name: ``ReftConfig(intervention=...)`` picks from here."""

from __future__ import annotations

from steerlab.reft._base import ReftIntervention
from steerlab.reft.consreft import ConsReFT
from steerlab.reft.direft import DiReFT
from steerlab.reft.lobireft import LobiReFT
from steerlab.reft.loreft import LoReFT
from steerlab.reft.noreft import NoReFT
from steerlab.reft.reft_r1 import ReFTr1

__all__ = ["INTERVENTION_TYPES", "ReftIntervention", "LoReFT", "DiReFT", "NoReFT", "ConsReFT", "LobiReFT", "ReFTr1"]

#: config name -> class (each is also registered with the base layer under the same name)
INTERVENTION_TYPES: dict[str, type[ReftIntervention]] = {
    "loreft": LoReFT,
    "direft": DiReFT,
    "noreft": NoReFT,
    "consreft": ConsReFT,
    "lobireft": LobiReFT,
    "reft_r1": ReFTr1,
}
