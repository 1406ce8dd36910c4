import ArgumentParser

@main
struct Corral: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "corral",
        abstract: "Turn libvirt hosts into a pool of rentable compute.",
        subcommands: [AgentCommand.self, BenchCommand.self, Domains.self, Host.self, InstancesCommand.self, KeysCommand.self, Pool.self]
    )
}
