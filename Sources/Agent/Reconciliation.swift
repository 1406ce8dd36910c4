import Foundation
import Libvirt
import PoolAPI

/// The agent's reconcile decision as plain values: given an instance's
/// record and its domain's state, what to do to the domain, what the
/// record becomes, and what the pool is told. No I/O, so the table tests
/// in ReconciliationTests cover every case without a VM.
enum Reconciliation {
    /// What reconciling reads.
    struct Observed: Sendable {
        var phase: LocalInstance.Phase
        /// Nil when the instance has no domain.
        var domain: DomainState?
        var expires: Date?
        var expiredAt: Date?
        var bootedAt: Date?
        /// The guest has written to its serial console.
        var consoleHasOutput: Bool
        var lastError: String?
        var now: Date
        var leaseGraceSeconds: Int
        var bootTimeoutSeconds: Int
    }

    /// What the domain is told, in order, before the report is made.
    enum Command: Sendable, Equatable {
        /// The lease ended: pause the running guest.
        case suspend
        /// The boot timed out: stop the guest, keep its disk.
        case destroy
    }

    /// The record's next values and the commands that get it there.
    struct Step: Sendable, Equatable {
        var phase: LocalInstance.Phase
        var expiredAt: Date?
        var lastError: String?
        var commands: [Command] = []
        /// The grace period after the lease ended is over: decommission.
        var decommission = false
        /// The guest came up (its console spoke while running).
        var cameUp = false
    }

    /// What the pool is told about an instance.
    struct PoolView: Sendable, Equatable {
        var state: InstanceState
        var error: String?
        /// Why it is suspended, in libvirt's words.
        var reason: String?
    }

    /// Moves a boot along and enforces the lease. Building and deleting
    /// instances belong to their tasks and are never passed here.
    static func step(_ observed: Observed) -> Step {
        var step = Step(phase: observed.phase, expiredAt: observed.expiredAt, lastError: observed.lastError)
        let now = observed.now
        if let expires = observed.expires, expires <= now, step.phase != .expired {
            if case .running = observed.domain { step.commands.append(.suspend) }
            step.phase = .expired
            step.expiredAt = now
        }
        if step.phase == .expired, let expiredAt = step.expiredAt,
            now >= expiredAt.addingTimeInterval(TimeInterval(observed.leaseGraceSeconds))
        {
            step.phase = .deleting
            step.decommission = true
        }
        if step.phase == .booting {
            if case .running = observed.domain, observed.consoleHasOutput {
                step.phase = .active
                step.cameUp = true
            } else if observed.domain.map({ !$0.isActive }) ?? true {
                step.phase = .errored
                step.lastError = "the guest stopped while booting (\(observed.domain?.description ?? "no domain"))"
            } else if now > (observed.bootedAt ?? now).addingTimeInterval(TimeInterval(observed.bootTimeoutSeconds)) {
                step.commands.append(.destroy)
                step.phase = .errored
                step.lastError =
                    "the guest did not come up within \(observed.bootTimeoutSeconds) s (no console output); it was stopped, its disk kept"
            }
        }
        if step.phase == .active, observed.domain == nil {
            step.phase = .errored
            step.lastError = "its libvirt domain disappeared"
        }
        return step
    }

    /// What the pool should know, from the record's phase and the domain's
    /// state after the step's commands ran.
    static func poolView(phase: LocalInstance.Phase, domain: DomainState?, lastError: String?) -> PoolView {
        switch (phase, domain) {
        case (.booting, _):
            return PoolView(state: .starting, error: lastError)
        case (.active, .running?), (.active, .blocked?), (.active, .shuttingDown?):
            return PoolView(state: .running, error: nil)
        case (.active, .crashed?), (.active, .shutoff(.crashed)?), (.active, .shutoff(.failed)?):
            let description = domain?.description ?? "no domain"
            return PoolView(state: .suspended, error: "the guest crashed (\(description))", reason: description)
        default:
            return PoolView(state: .suspended, error: lastError, reason: domain?.description ?? "no domain")
        }
    }
}
