import Foundation
import Libvirt
import PoolAPI
import Testing

@testable import Agent

/// The reconcile decision, phase × libvirt state, without a VM.
@Suite("Reconciliation")
struct ReconciliationTests {
    static let now = Date(timeIntervalSince1970: 1_800_000_000)

    static func observed(
        _ phase: LocalInstance.Phase, _ domain: DomainState?, console: Bool = false, expires: Date? = nil, expiredAt: Date? = nil,
        bootedAt: Date? = now.addingTimeInterval(-10), lastError: String? = nil
    ) -> Reconciliation.Observed {
        Reconciliation.Observed(
            phase: phase, domain: domain, expires: expires, expiredAt: expiredAt, bootedAt: bootedAt, consoleHasOutput: console,
            lastError: lastError, now: now, leaseGraceSeconds: 300, bootTimeoutSeconds: 600)
    }

    struct Row: Sendable, CustomTestStringConvertible {
        var observed: Reconciliation.Observed
        var phase: LocalInstance.Phase
        var commands: [Reconciliation.Command] = []
        var decommission = false
        var error: String? = nil
        var testDescription: String { "\(observed.phase) with \(observed.domain?.description ?? "no domain") → \(phase)" }
    }

    static let rows: [Row] = [
        // A boot: up once the running guest's console speaks.
        Row(observed: observed(.booting, .running(.booted), console: true), phase: .active),
        Row(observed: observed(.booting, .running(.booted), console: false), phase: .booting),
        Row(observed: observed(.booting, .paused(.starting)), phase: .booting),
        Row(
            observed: observed(.booting, .shutoff(.crashed)), phase: .errored,
            error: "the guest stopped while booting (shut off (crashed))"),
        Row(observed: observed(.booting, nil), phase: .errored, error: "the guest stopped while booting (no domain)"),
        Row(
            observed: observed(.booting, .running(.booted), bootedAt: now.addingTimeInterval(-601)), phase: .errored, commands: [.destroy],
            error: "the guest did not come up within 600 s (no console output); it was stopped, its disk kept"),
        // Built: the domain's state decides; a vanished domain is an error.
        Row(observed: observed(.active, .running(.booted)), phase: .active),
        Row(observed: observed(.active, .shutoff(.shutdown)), phase: .active),
        Row(observed: observed(.active, nil), phase: .errored, error: "its libvirt domain disappeared"),
        Row(observed: observed(.errored, .shutoff(.destroyed), lastError: "kept"), phase: .errored, error: "kept"),
        // Leases: a running guest is suspended at the end, decommissioned after the grace.
        Row(observed: observed(.active, .running(.booted), expires: now), phase: .expired, commands: [.suspend]),
        Row(observed: observed(.active, .shutoff(.shutdown), expires: now.addingTimeInterval(-1)), phase: .expired),
        Row(observed: observed(.booting, .running(.booted), console: true, expires: now), phase: .expired, commands: [.suspend]),
        Row(observed: observed(.active, .running(.booted), expires: now.addingTimeInterval(1)), phase: .active),
        Row(
            observed: observed(.expired, .paused(.user), expires: now.addingTimeInterval(-400), expiredAt: now.addingTimeInterval(-299)),
            phase: .expired),
        Row(
            observed: observed(.expired, .paused(.user), expires: now.addingTimeInterval(-400), expiredAt: now.addingTimeInterval(-300)),
            phase: .deleting, decommission: true),
        // An expired lease extended is the lease action's work, not reconciling's.
        Row(observed: observed(.expired, .paused(.user), expiredAt: now), phase: .expired),
    ]

    @Test("the next phase, commands and error", arguments: rows)
    func step(_ row: Row) {
        let step = Reconciliation.step(row.observed)
        #expect(step.phase == row.phase)
        #expect(step.commands == row.commands)
        #expect(step.decommission == row.decommission)
        #expect(step.lastError == row.error)
        #expect(step.cameUp == (row.observed.phase == .booting && row.phase == .active))
        if row.phase == .expired, row.observed.phase != .expired { #expect(step.expiredAt == Self.now) }
    }

    @Test("what the pool is told")
    func poolView() {
        typealias View = Reconciliation.PoolView
        let table: [(LocalInstance.Phase, DomainState?, String?, View)] = [
            (.booting, .running(.booted), nil, View(state: .starting)),
            (.active, .running(.booted), "stale", View(state: .running)),
            (.active, .blocked, nil, View(state: .running)),
            (.active, .shuttingDown, nil, View(state: .running)),
            (.active, .shutoff(.shutdown), nil, View(state: .suspended, reason: "shut off (shutdown)")),
            (.active, .paused(.user), nil, View(state: .suspended, reason: "paused (user)")),
            (
                .active, .shutoff(.crashed), nil,
                View(state: .suspended, error: "the guest crashed (shut off (crashed))", reason: "shut off (crashed)")
            ),
            (.active, .crashed, nil, View(state: .suspended, error: "the guest crashed (crashed)", reason: "crashed")),
            (.errored, nil, "its libvirt domain disappeared", View(state: .suspended, error: "its libvirt domain disappeared", reason: "no domain")),
            (.expired, .paused(.user), nil, View(state: .suspended, reason: "paused (user)")),
        ]
        for (phase, domain, error, expected) in table {
            #expect(Reconciliation.poolView(phase: phase, domain: domain, lastError: error) == expected, "\(phase) \(String(describing: domain))")
        }
    }
}
