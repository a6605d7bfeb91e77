//! `sallyport cert`: the subcommand's arguments handed to [`crate::certs`] (init, issue, renew,
//! revoke). It adds no rule of its own: every check and every file write is the certs module's.

use super::CertCommand;

pub(super) fn cert(command: CertCommand) -> anyhow::Result<String> {
    match command {
        CertCommand::Init {
            dir,
            gateway_names,
            gateway_ips,
            agent_names,
            site,
            days,
            force,
            new_ca,
        } => crate::certs::init(&crate::certs::InitOptions {
            dir,
            gateway_names,
            gateway_ips,
            agent_names,
            site,
            days,
            force,
            new_ca,
        }),
        CertCommand::Issue {
            dir,
            gateway,
            agent,
            site,
            days,
            force,
        } => {
            let subject = match agent {
                Some(name) => crate::certs::Subject::Agent { name, site },
                None => crate::certs::Subject::Gateway {
                    names: gateway.iter().map(|s| s.trim().to_string()).collect(),
                },
            };
            crate::certs::issue(&crate::certs::IssueOptions {
                dir,
                subject,
                days,
                force,
            })
        }
        CertCommand::Renew {
            dir,
            agent,
            gateway,
            days,
        } => {
            let stem = agent.or(gateway).unwrap_or_default();
            crate::certs::renew(&dir, &stem, days)
        }
        CertCommand::Revoke {
            dir,
            agent,
            cert,
            serial,
        } => {
            let what = match (agent, cert, serial) {
                (Some(name), _, _) => crate::certs::Revoke::Cert(dir.join(format!("{name}.crt"))),
                (_, Some(file), _) => crate::certs::Revoke::Cert(file),
                (_, _, serial) => crate::certs::Revoke::Serial(serial.unwrap_or_default()),
            };
            crate::certs::revoke(&dir, &what)
        }
    }
}
