//! X.509 devices go to the hub named after the organization (O) of their certificate's
//! subject, or its organizational unit (OU) when it has no organization. See README.md.

use berth_policy_sdk::{
    export_allocation_policy, log, Allocation, AllocationError, AllocationPolicy,
    AllocationRequest, AttestationKind, Twin,
};

struct CertificateOrganization;

impl AllocationPolicy for CertificateOrganization {
    fn allocate(request: AllocationRequest) -> Result<Allocation, AllocationError> {
        let attestation = &request.device.attestation;
        if attestation.kind != AttestationKind::X509 {
            return Err(AllocationError::unauthorized(
                "only X.509 devices are provisioned by this policy",
            ));
        }
        let certificate = attestation.certificate.as_ref().ok_or_else(|| {
            log::error("an X.509 device arrived without certificate facts");
            AllocationError::failed("the device's certificate is unknown")
        })?;
        let organization = [&certificate.organization, &certificate.organizational_unit]
            .into_iter()
            .flatten()
            .find(|name| !words(name).is_empty())
            .ok_or_else(|| {
                AllocationError::unauthorized("the certificate names no organization (O or OU)")
            })?;
        let wanted = words(organization);
        let Some(hub) = request.find_hub(|hub| names_organization(&hub.name, &wanted)) else {
            log::warn(format!(
                "no hub for organization '{organization}' (looked for '{}' in the hub names)",
                wanted.join("-")
            ));
            return Err(AllocationError::HubNotSpecified);
        };
        log::info(format!(
            "{} of '{organization}' goes to {}",
            request.device.registration_id, hub.name
        ));
        let twin =
            Twin::of_enrollment(&request.enrollment).tag("organization", organization.clone());
        Ok(Allocation::to_hub(&hub.name).with_twin(twin))
    }
}

/// The lowercased alphanumeric words of `text`: `Contoso Ltd.` gives `contoso` and `ltd`.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// True when the first DNS label of `hub_name`, split into words at `-` and other separators,
/// contains the organization's words in a row: "contoso-ltd-hub-1.azure-devices.net" names
/// "Contoso Ltd", "fab-hub" does not name "ab".
fn names_organization(hub_name: &str, organization: &[String]) -> bool {
    let label = hub_name.split('.').next().unwrap_or(hub_name);
    let hub_words = words(label);
    !organization.is_empty()
        && hub_words
            .windows(organization.len())
            .any(|run| run == organization)
}

export_allocation_policy!(CertificateOrganization);

#[cfg(test)]
mod tests {
    use berth_policy_sdk::{testing, AllocationError, AllocationPolicy, AllocationRequest, Twin};

    use super::{names_organization, words, CertificateOrganization};

    const CONTOSO: &str = "contoso-ltd-hub-1.azure-devices.net";
    const FABRIKAM: &str = "fabrikam-hub.azure-devices.net";

    fn x509(certificate: berth_policy_sdk::CertificateFacts) -> AllocationRequest {
        testing::request("sensor-9")
            .hub(FABRIKAM)
            .hub(CONTOSO)
            .x509(certificate)
            .build()
    }

    #[test]
    fn device_goes_to_the_hub_named_after_its_organization() {
        let request = x509(testing::certificate("sensor-9").with_organization("Contoso Ltd."));
        let allocation = CertificateOrganization::allocate(request).unwrap();
        assert_eq!(allocation.hub, CONTOSO);
        assert_eq!(
            Twin::from_json(allocation.initial_twin.as_deref().unwrap()).unwrap(),
            Twin::new().tag("organization", "Contoso Ltd.")
        );

        let request = x509(testing::certificate("sensor-9").with_organization("FABRIKAM"));
        assert_eq!(
            CertificateOrganization::allocate(request).unwrap().hub,
            FABRIKAM
        );
    }

    #[test]
    fn organizational_unit_stands_in_for_a_missing_organization() {
        let request = x509(testing::certificate("sensor-9").with_organizational_unit("Fabrikam"));
        assert_eq!(
            CertificateOrganization::allocate(request).unwrap().hub,
            FABRIKAM
        );
        // The organization wins when both are present.
        let request = x509(
            testing::certificate("sensor-9")
                .with_organization("Contoso Ltd")
                .with_organizational_unit("Fabrikam"),
        );
        assert_eq!(
            CertificateOrganization::allocate(request).unwrap().hub,
            CONTOSO
        );
    }

    #[test]
    fn devices_that_are_not_x509_are_unauthorized() {
        let unauthorized = AllocationError::Unauthorized(
            "only X.509 devices are provisioned by this policy".to_owned(),
        );
        let symmetric_key = testing::request("sensor-9").hub(CONTOSO).build();
        assert_eq!(
            CertificateOrganization::allocate(symmetric_key).unwrap_err(),
            unauthorized
        );
        let tpm = testing::request("sensor-9")
            .hub(CONTOSO)
            .tpm("AToAAQALAAMAsgAg")
            .build();
        assert_eq!(
            CertificateOrganization::allocate(tpm).unwrap_err(),
            unauthorized
        );
    }

    #[test]
    fn certificate_without_organization_is_unauthorized() {
        let request = x509(testing::certificate("sensor-9").with_organization("--"));
        assert_eq!(
            CertificateOrganization::allocate(request).unwrap_err(),
            AllocationError::Unauthorized(
                "the certificate names no organization (O or OU)".to_owned()
            )
        );
    }

    #[test]
    fn organization_without_a_hub_names_no_hub() {
        let request = x509(testing::certificate("sensor-9").with_organization("Northwind"));
        assert_eq!(
            CertificateOrganization::allocate(request).unwrap_err(),
            AllocationError::HubNotSpecified
        );
        assert!(testing::logs()
            .iter()
            .any(|(_, line)| line.contains("'northwind'")));
    }

    #[test]
    fn organizations_match_whole_words_of_the_hub_label() {
        assert_eq!(words("Contoso Ltd."), ["contoso", "ltd"]);
        assert!(names_organization(CONTOSO, &words("contoso")));
        assert!(names_organization(CONTOSO, &words("Contoso LTD")));
        assert!(!names_organization(CONTOSO, &words("ltd contoso")));
        assert!(!names_organization(
            "fab-hub.azure-devices.net",
            &words("ab")
        ));
        assert!(!names_organization("hub.contoso.net", &words("contoso")));
        assert!(!names_organization(CONTOSO, &[]));
    }
}
