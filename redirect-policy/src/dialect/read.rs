//! One object's annotations, read key by key into a [`Layer`]'s fields: the steps every dialect
//! shares (look the key up, parse its value with the dialect's syntax, add the setting with the
//! dialect's merge rule), so that a dialect module says only which keys, fields and syntax.

use ipnet::IpNet;

use crate::layer::{Layer, Merge, Setting};
use crate::types::{Annotations, Origin, PolicyError, PortRange};
use crate::values::{self, CidrSyntax, Ctx};

/// What a simple key holds and where it goes: the whole of what a table-driven dialect (Kuma,
/// Linkerd, FSM/OSM) says about one key.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Spec {
    /// A port list with the dialect's range separator, if it has ranges.
    Ports(Option<char>, PortField),
    /// A CIDR list in the dialect's syntax.
    Cidrs(CidrSyntax, CidrField),
    /// The proxy's uid.
    ProxyUid,
}

/// The [`Layer`] port lists a key can set.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PortField {
    Exclude,
    InboundExclude,
}

/// The [`Layer`] CIDR lists a key can set.
#[derive(Clone, Copy, Debug)]
pub(crate) enum CidrField {
    Exclude,
    Include,
    /// Inbound *source* addresses.
    InboundExclude,
}

impl PortField {
    fn of(self, layer: &mut Layer) -> &mut Vec<Setting<PortRange>> {
        match self {
            PortField::Exclude => &mut layer.exclude_ports,
            PortField::InboundExclude => &mut layer.inbound_exclude_ports,
        }
    }
}

impl CidrField {
    fn of(self, layer: &mut Layer) -> &mut Vec<Setting<IpNet>> {
        match self {
            CidrField::Exclude => &mut layer.exclude_cidrs,
            CidrField::Include => &mut layer.include_cidrs,
            CidrField::InboundExclude => &mut layer.inbound_exclude_cidrs,
        }
    }
}

pub(crate) struct Reader<'a> {
    origin: &'a Origin,
    ann: &'a Annotations,
    warnings: &'a mut Vec<String>,
    merge: Merge,
    /// FSM/OSM split an empty value into one empty item and fail on it.
    nonempty: bool,
}

impl<'a> Reader<'a> {
    pub fn new(
        origin: &'a Origin,
        ann: &'a Annotations,
        warnings: &'a mut Vec<String>,
        merge: Merge,
    ) -> Self {
        Reader {
            origin,
            ann,
            warnings,
            merge,
            nonempty: false,
        }
    }

    /// The same object read with another merge rule and empty values refused (FSM/OSM).
    pub fn fsm(&mut self) -> Reader<'_> {
        Reader {
            origin: self.origin,
            ann: self.ann,
            warnings: self.warnings,
            merge: Merge::Union,
            nonempty: true,
        }
    }

    /// The key's context and raw value, when the object has the key.
    pub fn get<'k>(&self, key: &'k str) -> Result<Option<(Ctx<'k>, &'a str)>, PolicyError>
    where
        'a: 'k,
    {
        let Some(raw) = self.ann.get(key) else {
            return Ok(None);
        };
        let ctx = Ctx::new(self.origin, key);
        if self.nonempty && raw.trim().is_empty() {
            return Err(ctx.error(raw.trim(), "empty value (FSM/OSM need at least one item)"));
        }
        Ok(Some((ctx, raw)))
    }

    /// Adds `values` under `key` with this reader's merge rule.
    pub fn push<T>(&self, ctx: &Ctx, field: &mut Vec<Setting<T>>, values: Vec<T>) {
        field.push(Setting::new(self.merge, ctx.source(), values));
    }

    /// Reads every key of `table` (under `prefix`) into `layer`, in table order.
    pub fn table(
        &mut self,
        prefix: &str,
        table: &[(&str, Spec)],
        layer: &mut Layer,
    ) -> Result<(), PolicyError> {
        for &(name, spec) in table {
            let key = format!("{prefix}{name}");
            match spec {
                Spec::Ports(range, field) => self.ports(&key, range, field.of(layer))?,
                Spec::Cidrs(syntax, field) => self.cidrs(&key, syntax, field.of(layer))?,
                Spec::ProxyUid => self.uid(&key, &mut layer.proxy_uid)?,
            }
        }
        Ok(())
    }

    /// A port list (`range` is the dialect's range separator, if it has ranges).
    pub fn ports(
        &mut self,
        key: &str,
        range: Option<char>,
        field: &mut Vec<Setting<PortRange>>,
    ) -> Result<(), PolicyError> {
        if let Some((ctx, raw)) = self.get(key)? {
            let v = values::port_list(&ctx, raw, range)?;
            self.push(&ctx, field, v);
        }
        Ok(())
    }

    /// A CIDR list in the dialect's syntax.
    pub fn cidrs(
        &mut self,
        key: &str,
        syntax: CidrSyntax,
        field: &mut Vec<Setting<IpNet>>,
    ) -> Result<(), PolicyError> {
        if let Some((ctx, raw)) = self.get(key)? {
            let v = values::cidr_list(&ctx, raw, syntax, self.warnings)?;
            self.push(&ctx, field, v);
        }
        Ok(())
    }

    /// The CIDR list parser with this reader's warnings, for keys with a syntax of their own.
    pub fn cidr_list(
        &mut self,
        ctx: &Ctx,
        raw: &str,
        syntax: CidrSyntax,
    ) -> Result<Vec<IpNet>, PolicyError> {
        values::cidr_list(ctx, raw, syntax, self.warnings)
    }

    /// A uid (a scalar: one value).
    pub fn uid(&mut self, key: &str, field: &mut Vec<Setting<u32>>) -> Result<(), PolicyError> {
        if let Some((ctx, raw)) = self.get(key)? {
            let uid = values::uid(&ctx, raw)?;
            self.push(&ctx, field, vec![uid]);
        }
        Ok(())
    }
}
